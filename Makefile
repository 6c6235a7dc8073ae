# Two entry points, each safe to run twice: install what is missing, then run.
#   make demo    online DPO on the shipped text world with the real PP-OCRv5 reward (outputs/demo, replaced each time)
#   make test    the test suite (CPU, no network): exactly `python -m pytest -q tests`, as .ci/run runs it
# torch comes first, for the machine: the CPU wheel by default; on a CUDA machine `make demo TORCH_INDEX=`
# takes PyPI's default build of the same version (CUDA on Linux).

PYTHON ?= python
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

# exit status 0 when every line of requirements.txt is installed at an allowed version (then pip,
# which takes a minute to say so, is skipped); any missing package, version or module -> pip runs
REQUIREMENTS_MET = import sys; from importlib.metadata import version; from packaging.requirements import Requirement; \
	reqs = [Requirement(line) for line in open("requirements.txt") if line.strip() and not line.startswith("\#")]; \
	sys.exit(any(not r.specifier.contains(version(r.name), prereleases=True) for r in reqs))

.PHONY: install demo test

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || \
		$(PYTHON) -m pip install torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	@$(PYTHON) -c '$(REQUIREMENTS_MET)' 2>/dev/null || $(PYTHON) -m pip install -r requirements.txt

demo: install
	$(PYTHON) train_online_dpo.py --preset text_world --output_dir outputs/demo --overwrite_output_dir true

test: install
	$(PYTHON) -m pytest -q tests
