import pytest
import torch
from hypothesis import given, settings, strategies as st

from pairing import (interleave, pair_stats, sample_pair_noise_and_sigmas, sample_sigmas, select_pairs, tied_candidates,
                     validate_pairs)


def test_best_worst_and_top_bottom_on_an_interleaved_batch():
    groups = ["a", "b", "a", "b", "a", "b", "a", "b"]
    rewards = torch.tensor([0.1, 0.5, 0.9, 0.5, 0.3, 0.5, 0.7, 0.5])  # group b ties
    assert select_pairs(groups, rewards).tolist() == [[2, 0]]
    assert select_pairs(groups, rewards, "top_bottom").tolist() == [[2, 0], [6, 4]]
    assert select_pairs(groups, rewards, "top_bottom", min_margin=0.5).tolist() == [[2, 0]]
    stats = pair_stats(groups, rewards, select_pairs(groups, rewards))
    assert stats == {"pairs_kept": 1.0, "groups": 2.0, "groups_without_pair": 1.0, "tie_groups": 1.0,
                     "reward_gap_mean": pytest.approx(0.8)}


def test_ties_in_sorting_are_broken_by_index_and_groups_keep_first_appearance_order():
    groups = torch.tensor([7, 3, 7, 3, 7, 3])
    rewards = torch.tensor([1.0, 0.0, 1.0, 2.0, 0.0, 0.0])
    assert select_pairs(groups, rewards, "top_bottom").tolist() == [[0, 4], [3, 5]]
    assert select_pairs(groups, rewards).tolist() == [[0, 4], [3, 5]]


def test_singletons_give_no_pair_and_nan_names_the_index():
    assert select_pairs(["x", "y"], torch.tensor([1.0, 0.0])).shape == (0, 2)
    with pytest.raises(ValueError, match="index 2"):
        select_pairs([0, 0, 1, 1], torch.tensor([1.0, 0.0, float("nan"), 0.0]))
    with pytest.raises(ValueError, match="strategy"):
        select_pairs([0, 0], torch.tensor([1.0, 0.0]), "random")
    with pytest.raises(ValueError):
        select_pairs([0, 0, 0], torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="min_margin"):
        select_pairs([0, 0], torch.tensor([1.0, 0.0]), min_margin=-1)


@st.composite
def scored_groups(draw):
    n_groups = draw(st.integers(1, 5))
    sizes = [draw(st.integers(1, 9)) for _ in range(n_groups)]
    groups = [g for g, k in enumerate(sizes) for _ in range(k)]
    groups = draw(st.permutations(groups))
    rewards = draw(st.lists(st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]) | st.floats(-10, 10),
                            min_size=len(groups), max_size=len(groups)))
    margin = draw(st.sampled_from([0.0, 0.1, 0.5]))
    return list(groups), torch.tensor(rewards, dtype=torch.float64), margin


@settings(max_examples=200, deadline=None)
@given(scored_groups(), st.sampled_from(["best_worst", "top_bottom"]))
def test_pair_properties(data, strategy):
    groups, rewards, margin = data
    pairs = select_pairs(groups, rewards, strategy, margin)
    sizes = {g: groups.count(g) for g in set(groups)}
    per_group = {}
    for c, r in pairs.tolist():
        assert groups[c] == groups[r]
        assert rewards[c] - rewards[r] > margin
        per_group[groups[c]] = per_group.get(groups[c], 0) + 1
    for g, n in per_group.items():
        assert n <= sizes[g] // 2
    if strategy == "top_bottom":
        used = pairs.flatten().tolist()
        assert len(used) == len(set(used))
    else:
        for g in sizes:
            members = [i for i, x in enumerate(groups) if x == g]
            spread = rewards[members].max() - rewards[members].min()
            assert per_group.get(g, 0) == (1 if len(members) > 1 and spread > margin else 0)
    # interleaving puts each pair's rows side by side and validates
    inter_groups = interleave(pairs, groups)
    validate_pairs(inter_groups, interleave(pairs, rewards))
    stats = pair_stats(groups, rewards, pairs)
    assert stats["pairs_kept"] == pairs.shape[0]
    assert stats["groups_without_pair"] == len(sizes) - len(per_group)


def test_interleave_and_validate():
    pairs = torch.tensor([[2, 0], [3, 1]])
    x = torch.arange(4 * 3).reshape(4, 3)
    assert interleave(pairs, x)[:, 0].tolist() == [6, 0, 9, 3]
    assert interleave(pairs, ["a", "b", "c", "d"]) == ["c", "a", "d", "b"]
    with pytest.raises(ValueError, match="pair 1"):
        validate_pairs(["a", "a", "b", "c"], [1.0, 0.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="pair 0"):
        validate_pairs(["a", "a"], [0.0, 1.0])
    with pytest.raises(ValueError):
        validate_pairs(["a", "a", "b"], [1.0, 0.0, 1.0])


@pytest.mark.parametrize("scheme", ["logit_normal", "uniform", "mode"])
def test_noise_and_sigma_are_shared_within_pairs_and_differ_across(scheme):
    latents = torch.randn(6, 16, 64)
    noise, sigmas = sample_pair_noise_and_sigmas(latents, torch.Generator().manual_seed(0), scheme)
    assert noise.shape == latents.shape and sigmas.shape == (6,)
    assert torch.equal(noise[0::2], noise[1::2]) and torch.equal(sigmas[0::2], sigmas[1::2])
    assert not torch.equal(noise[0], noise[2]) and len(set(sigmas[0::2].tolist())) == 3
    assert ((sigmas > 0) & (sigmas < 1)).all()
    again = sample_pair_noise_and_sigmas(latents, torch.Generator().manual_seed(0), scheme)
    assert torch.equal(again[0], noise) and torch.equal(again[1], sigmas)
    with pytest.raises(ValueError):
        sample_pair_noise_and_sigmas(latents[:5], torch.Generator(), scheme)


def test_logit_normal_sigmas_have_the_right_distribution():
    s = sample_sigmas(20000, "logit_normal", torch.Generator().manual_seed(0))
    logits = torch.log(s / (1 - s))
    assert abs(logits.mean().item()) < 0.03 and abs(logits.std().item() - 1) < 0.03
    with pytest.raises(ValueError, match="sigma scheme"):
        sample_sigmas(3, "cosine")


def test_zero_margin_pairs_are_never_trained_and_counted_as_tied():
    """top_bottom's inner pairs can tie (margin 0): select_pairs drops them even with min_reward_margin
    0 (a pair needs margin > min); tied_candidates counts them; a margin > 0 drops small gaps too."""
    from pairing import tied_candidates

    groups = ["a"] * 6
    rewards = torch.tensor([1.0, 0.5, 0.5, 0.5, 0.5, 0.2])  # pairs (0,5) gap 0.8, (1,4) and (2,3) tied
    assert select_pairs(groups, rewards, "top_bottom").tolist() == [[0, 5]]
    assert tied_candidates(groups, rewards, "top_bottom") == (2, 3)
    assert tied_candidates(groups, rewards, "best_worst") == (0, 1)
    near = torch.tensor([1.0, 0.6, 0.5, 0.5, 0.4, 0.2])  # gaps 0.8, 0.2, 0.0
    assert select_pairs(groups, near, "top_bottom").tolist() == [[0, 5], [1, 4]]
    assert select_pairs(groups, near, "top_bottom", min_margin=0.25).tolist() == [[0, 5]]


@pytest.mark.parametrize("n_pairs,updates", [(8, 4), (7, 3), (2, 4), (0, 2), (5, 1)])
def test_update_parts_use_every_pair_once_when_disjoint(n_pairs, updates):
    from pairing import update_parts

    uses = [0] * n_pairs
    for lo, hi in update_parts(n_pairs, updates, "disjoint"):
        for p in range(lo, hi):
            uses[p] += 1
    assert uses == [1] * n_pairs and len(update_parts(n_pairs, updates, "disjoint")) == updates
    sizes = [hi - lo for lo, hi in update_parts(n_pairs, updates, "disjoint")]
    assert max(sizes) - min(sizes) <= 1
    assert update_parts(n_pairs, updates, "all") == [(0, n_pairs)] * updates
    with pytest.raises(ValueError, match="split"):
        update_parts(n_pairs, updates, "half")


@settings(max_examples=200, deadline=None)
@given(scored_groups())
def test_all_pairs_are_every_ordered_comparison_of_a_group_above_the_margin(data):
    """"all": exactly the set {(i, j): same group, reward i - reward j > margin}, by brute force; best
    first within a group, and validate_pairs accepts them."""
    groups, rewards, margin = data
    selected = select_pairs(groups, rewards, "all", margin)
    pairs = selected.tolist()
    brute = {(i, j) for i in range(len(groups)) for j in range(len(groups))
             if groups[i] == groups[j] and rewards[i] - rewards[j] > margin}
    assert len(pairs) == len(set(map(tuple, pairs))) and set(map(tuple, pairs)) == brute
    for (c1, _), (c2, _) in zip(pairs, pairs[1:]):
        if groups[c1] == groups[c2]:
            assert rewards[c1] >= rewards[c2]  # chosen in rank order
    validate_pairs(interleave(selected, groups), interleave(selected, rewards))
    tied, candidates = tied_candidates(groups, rewards, "all")
    sizes = [groups.count(g) for g in set(groups)]
    assert candidates == sum(k * (k - 1) // 2 for k in sizes)
    assert tied == sum(1 for i in range(len(groups)) for j in range(i + 1, len(groups))
                       if groups[i] == groups[j] and rewards[i] == rewards[j])
