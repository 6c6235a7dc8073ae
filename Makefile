# Two entry points, each safe to run twice: install what is missing, then run.
#   make demo    online DPO on the shipped text world with the real PP-OCRv5 reward (outputs/demo, replaced each time)
#   make test    the test suite (CPU, no network): exactly `python -m pytest -q tests`, as .ci/run runs it
# torch comes first, for the machine: the CPU wheel by default; on a CUDA machine `make demo TORCH_INDEX=`
# takes PyPI's default build of the same version (CUDA on Linux).

PYTHON ?= python
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

# torch from TORCH_INDEX, tried once with a short timeout (an index this machine cannot reach would
# otherwise cost pip's 5 retries per package, ~100 s); failing that, the default index, said in one line
PIP_TORCH = $(PYTHON) -m pip install torch==$(TORCH_VERSION)
INSTALL_TORCH = $(if $(TORCH_INDEX),$(PIP_TORCH) --index-url $(TORCH_INDEX) --timeout 5 --retries 0 || \
	{ echo "note: torch from $(TORCH_INDEX) failed; trying the default index"; $(PIP_TORCH); },$(PIP_TORCH))

.PHONY: install demo test

# requirements_met.py: exit 0 when every line of requirements.txt is installed at an allowed version
# (then pip, which takes a minute to say so, is skipped); otherwise it names what is missing
install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(INSTALL_TORCH)
	@$(PYTHON) requirements_met.py || $(PYTHON) -m pip install -r requirements.txt

demo: install
	$(PYTHON) train_online_dpo.py --preset text_world --output_dir outputs/demo --overwrite_output_dir true

test: install
	$(PYTHON) -m pytest -q tests
