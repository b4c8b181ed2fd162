"""Algorithm 1: planted features are found, the vectorised version equals the plain loop."""
import os
import subprocess
import sys

import pytest
import torch
from conftest import planted

from classfilters import InfluentialFeatures, influential_features
from classfilters.influence import class_histograms, mass_mask, topk_indices
from classfilters.reference import influential_features_loop
from classfilters.topk_cpu import topk_rows_cpu


def test_planted_class_specific_feature_is_recovered():
    features, labels = planted()
    result = influential_features(features, labels, k=2, k_prime=2)
    for c, idx in enumerate(result.indices):
        assert idx == [3 * c, 3 * c + 1]
    assert result.histograms[0, 0] == 40  # every image of class 0 has feature 0 in its top 2


@pytest.mark.parametrize("seed,k,kp", [(0, 5, 5), (1, 1, 3), (2, 12, 7), (3, 32, 32), (4, 20, 1)])
def test_vectorised_equals_reference_loop(seed, k, kp):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 7, (500,), generator=gen)
    labels[:7] = torch.arange(7)
    # ReLU features: many exact zeros, so ties at the k-th value are common and must be broken alike
    features = torch.relu(torch.randn(500, 32, generator=gen) + 0.3 * labels[:, None] % 3 - 0.5)
    ours = influential_features(features, labels, k, kp).indices
    assert ours == influential_features_loop(features.numpy(), labels.numpy(), k, kp, 7)


def test_negative_features_are_ranked_by_magnitude():
    gen = torch.Generator().manual_seed(5)
    features = torch.randn(300, 16, generator=gen)
    labels = torch.randint(0, 4, (300,), generator=gen)
    result = influential_features(features, labels, 4, 4)
    assert result.rank_by == "magnitude"
    assert result.indices == influential_features_loop(features.numpy(), labels.numpy(), 4, 4, 4)
    features[:, 0] = -100.0  # hugely negative: the largest magnitude everywhere
    assert all(idx[0] == 0 for idx in influential_features(features, labels, 1, 1).indices)


def test_ties_go_to_the_lower_index():
    scores = torch.zeros(3, 10)
    scores[1, 7] = 1.0
    assert topk_indices(scores, 3).sort(1).values.tolist() == [[0, 1, 2], [0, 1, 7], [0, 1, 2]]
    hist = torch.tensor([[2, 5, 5, 0, 5]])
    from classfilters.influence import select_indices
    assert select_indices(hist, 3) == [[1, 2, 4]]


def test_chunking_does_not_change_histograms():
    features, labels = planted(seed=3)
    # float64 takes the chunked torch path; float32 the CPU kernel, which must agree with it
    a, _ = class_histograms(features.double(), labels, 6, 5, chunk_size=7)
    b, _ = class_histograms(features.double(), labels, 6, 5)
    c, _ = class_histograms(features, labels, 6, 5)
    assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("n,d,k", [(300, 64, 5), (200, 100, 16), (200, 2048, 50), (100, 47, 20),
                                   (50, 30, 30), (50, 33, 1), (7, 20, 17)])
def test_cpu_kernel_equals_torch_topk(compress, n, d, k):
    """The numba kernel (both compaction paths) against `torch.topk` + the tie fix-up, on spread
    values, on small integers (ties everywhere) and on signed values (ranked by magnitude)."""
    gen = torch.Generator().manual_seed(n + d + k)
    for features in (torch.relu(torch.randn(n, d, generator=gen)), torch.randint(0, 3, (n, d), generator=gen).float(),
                     torch.randn(n, d, generator=gen)):
        top, nonfinite, negative = topk_rows_cpu(features, k, compress)
        expected = topk_indices(features.abs(), k).sort(1).values
        assert torch.equal(torch.from_numpy(top).long(), expected)
        assert not nonfinite.any() and negative.tolist() == (features < 0).any(1).tolist()


def test_cpu_kernel_flags_nonfinite_rows_and_ties_signed_zero():
    features = torch.tensor([[1.0, 2.0, 3.0], [1.0, float("nan"), 0.0], [float("-inf"), 0.0, 1.0],
                             [-0.0, 0.0, -0.0], [0.5, -0.0, 0.0]])
    top, nonfinite, negative = topk_rows_cpu(features, 2)
    assert nonfinite.tolist() == [False, True, True, False, False]
    assert not negative[[0, 3, 4]].any()  # -0.0 is not negative
    assert top[3].tolist() == [0, 1] and top[4].tolist() == [0, 1]  # -0.0 ties with 0.0: lower index first
    with pytest.raises(ValueError, match="2 rows hold NaN or inf"):
        influential_features(features, torch.tensor([0, 1, 0, 1, 0]), 2, 2)


def test_value_ranking_of_signed_features_leaves_the_kernel():
    gen = torch.Generator().manual_seed(9)
    features = torch.randn(200, 24, generator=gen)
    labels = torch.randint(0, 3, (200,), generator=gen)
    by_value = influential_features(features, labels, 4, 4, rank_by="value")
    assert by_value.rank_by == "value"
    shifted = features - features.min()  # non-negative, same order of values in every row
    assert by_value.indices == influential_features_loop(shifted.numpy(), labels.numpy(), 4, 4, 3)


def test_fractions_of_mass():
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    # row 0 covers 70 % of its mass (10) with 4 + 3; row 1 has no mass; row 2 needs 3 of 4 equal parts
    assert mass_mask(scores, 0.7).tolist() == [[True, True, False, False], [False] * 4, [True, True, True, False]]
    features, labels = planted()
    small = influential_features(features, labels, 0.3, 0.5)
    large = influential_features(features, labels, 0.9, 0.95)
    assert all(len(a) <= len(b) for a, b in zip(small.indices, large.indices))
    assert all(idx[0] == 3 * c for c, idx in enumerate(small.indices))


def test_json_round_trip(tmp_path):
    features, labels = planted()
    result = influential_features(features, labels, 3, 0.8, provenance={"model": "planted"})
    result.save(tmp_path / "r.json")
    back = InfluentialFeatures.load(tmp_path / "r.json")
    assert back.indices == result.indices and torch.equal(back.histograms, result.histograms)
    assert (back.k, back.k_prime, back.provenance["model"]) == (3, 0.8, "planted")
    assert torch.equal(back.mask, result.mask) and back.multiply_adds == result.multiply_adds


@pytest.mark.parametrize("k,kp,message", [(0, 5, "k=0 is out of range"), (33, 5, "between 1 and D=32"),
                                          (5, 40, "k'=40 is out of range"), (1.5, 5, "fraction"),
                                          (5, 0.0, "fraction"), ("5", 5, "int count")])
def test_k_out_of_range(k, kp, message):
    features, labels = planted()
    with pytest.raises((ValueError, TypeError), match=message):
        influential_features(features, labels, k, kp)


def test_class_without_images_and_nan_features():
    features, labels = planted()
    with pytest.raises(ValueError, match=r"classes \[6\] have no training images"):
        influential_features(features, labels, 3, 3, num_classes=7)
    features[5, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        influential_features(features, labels, 3, 3)
    with pytest.raises(ValueError, match="labels have shape"):
        influential_features(features[10:], labels, 3, 3)


GPU_KERNEL_CHECK = """
import torch
from classfilters.topk_cpu import class_histograms_cpu
from classfilters.topk_gpu import class_histograms_gpu
gen = torch.Generator().manual_seed(0)
for n, d, k, c in ((40, 100, 7, 3), (30, 64, 5, 4), (20, 33, 33, 2), (20, 47, 1, 5), (10, 300, 50, 3)):
    labels = torch.randint(0, c, (n,), generator=gen)
    for x in (torch.relu(torch.randn(n, d, generator=gen)), torch.randint(0, 3, (n, d), generator=gen).float(),
              torch.randn(n, d, generator=gen)):
        gpu, cpu = class_histograms_gpu(x, labels, c, k), class_histograms_cpu(x, labels, c, k)
        assert torch.equal(gpu[0], cpu[0]) and torch.equal(gpu[1], cpu[1]) and gpu[2] == cpu[2], (n, d, k)
x = torch.tensor([[1.0, 2.0, 3.0], [1.0, float("nan"), 0.0], [float("inf"), 0.0, 1.0], [-0.0, 0.0, -0.0]])
hist, nonfinite, negative = class_histograms_gpu(x, torch.tensor([0, 1, 0, 1]), 2, 2)
assert nonfinite.tolist() == [False, True, True, False] and not negative
assert hist.tolist() == [[0, 1, 1], [1, 1, 0]]  # -0.0 ties with 0.0: the lower indices
"""


def test_gpu_kernel_equals_cpu_kernel_in_the_triton_interpreter():
    """The Triton kernel, run on the CPU by Triton's interpreter, against the numba kernel."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", GPU_KERNEL_CHECK], env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_influence_on_the_gpu_equals_the_cpu():
    gen = torch.Generator().manual_seed(11)
    labels = torch.randint(0, 20, (5000,), generator=gen)
    labels[:20] = torch.arange(20)
    for features in (torch.relu(torch.randn(5000, 2048, generator=gen)), torch.randint(0, 4, (5000, 640), generator=gen).float(),
                     torch.randn(5000, 100, generator=gen)):
        for k, kp in ((50, 50), (5, 3), (0.5, 0.9)):
            gpu = influential_features(features.cuda(), labels.cuda(), k, kp)
            cpu = influential_features(features, labels, k, kp)
            assert gpu.indices == cpu.indices and torch.equal(gpu.histograms, cpu.histograms) and gpu.rank_by == cpu.rank_by


@pytest.mark.parametrize("width,warps", [(64, 1), (2048, 1), (2208, 2), (16384, 8)])
def test_gpu_kernel_compiles_for_the_h100(width, warps):
    """The Triton kernel compiled to an sm_90 binary without a GPU: what the interpreter cannot check
    (types of loop-carried values, globals, shapes) fails here instead of on the first GPU run."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from classfilters.topk_gpu import _class_histograms_kernel
    signature = {"x_ptr": "*fp32", "labels_ptr": "*i64", "hist_ptr": "*i32", "flags_ptr": "*i32", "d": "i32",
                 "stride": "i32", "k": "i32", "BLOCK": "constexpr"}
    source = ASTSource(fn=_class_histograms_kernel, signature=signature,
                       constexprs={"BLOCK": triton.next_power_of_2(width)})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    assert compiled.asm["cubin"] and "atom" in compiled.asm["ptx"]


def test_triton_is_imported_only_for_cuda_features():
    """Importing Triton costs about a second, paid by every notebook's kernel: CPU work never imports it."""
    check = ("import sys, torch\nfrom classfilters import influential_features, tables\n"
             "from classfilters.influence import gpu_kernel_takes\n"
             "x = torch.rand(20, 8)\ninfluential_features(x, torch.arange(20) % 2, 3, 3)\n"
             "assert not gpu_kernel_takes(x) and 'triton' not in sys.modules\n")
    proc = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_mass_of_rows_below_one_and_the_saved_layout(tmp_path):
    """A row whose whole mass is below 1 (softmax-like features) still keeps its top entries; the JSON is indented
    for people to read."""
    scores = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    assert mass_mask(scores, 0.5).tolist() == [[True, False, False], [False, True, False]]
    assert mass_mask(scores, 0.75).tolist() == [[True, True, False], [False, True, True]]
    features, labels = planted()
    path = tmp_path / "r.json"
    influential_features(features, labels, 3, 2).save(path)
    assert path.read_text().startswith('{\n "k": 3,\n "k_prime": 2,\n "rank_by": "value",')


def test_index_sets_from_histograms_by_hand():
    """select_indices: the k' most counted (lower index first among equal counts), or the fewest most counted
    holding a fraction of the class's picks."""
    from classfilters.influence import select_indices
    h = torch.tensor([[5, 3, 2, 0], [2, 3, 3, 0], [0, 0, 0, 4]])
    assert select_indices(h, 1) == [[0], [1], [3]]
    assert select_indices(h, 2) == [[0, 1], [1, 2], [3, 0]]
    assert select_indices(h, 4) == [[0, 1, 2, 3], [1, 2, 0, 3], [3, 0, 1, 2]]
    assert select_indices(h, 0.5) == [[0], [1, 2], [3]]    # 5 of 10; 3 + 3 of 8 (3 alone is 37.5 %); 4 of 4
    assert select_indices(h, 0.6) == [[0, 1], [1, 2], [3]]
    assert select_indices(h, 1.0) == [[0, 1, 2], [1, 2, 0], [3]]


def test_the_dict_form_names_every_field_and_defaults_the_optional_ones():
    """The JSON the CLI writes: exactly these keys; a dict without `rank_by` / `provenance` (older files) reads
    as ranked by value with no provenance."""
    features, labels = planted()
    d = influential_features(features, labels, 3, 2).to_dict()
    assert list(d) == ["k", "k_prime", "rank_by", "num_classes", "num_features", "indices", "histograms", "provenance"]
    assert (d["num_classes"], d["num_features"]) == (6, 32)
    minimal = {"indices": [[1], [0]], "histograms": [[0, 2], [3, 1]], "k": 1, "k_prime": 1}
    back = InfluentialFeatures.from_dict(minimal)
    assert back.rank_by == "value" and back.provenance == {} and back.histograms.dtype == torch.int64


def test_the_torch_path_equals_the_reference_for_signed_features_in_both_rankings():
    """float64 features leave the CPU kernel for the chunked torch path: there too, signed features are ranked by
    magnitude ("auto") or by value as asked, the sets equal the reference loop's and the histograms are int64
    counts, whatever the chunk size."""
    gen = torch.Generator().manual_seed(11)
    features = torch.randn(240, 20, generator=gen, dtype=torch.float64)
    labels = torch.arange(240) % 4
    auto = influential_features(features, labels, 3, 4)
    assert auto.rank_by == "magnitude" and auto.histograms.dtype == torch.int64
    assert auto.indices == influential_features_loop(features.numpy(), labels.numpy(), 3, 4, 4)
    by_value = influential_features(features, labels, 3, 4, rank_by="value")
    shifted = features - features.min()  # non-negative, the same order of values in every row
    assert by_value.indices == influential_features_loop(shifted.numpy(), labels.numpy(), 3, 4, 4) != auto.indices
    chunked, rank_by = class_histograms(features, labels, 4, 3, chunk_size=50)
    assert rank_by == "magnitude" and chunked.dtype == torch.int64 and torch.equal(chunked, auto.histograms)
    assert int(chunked.sum()) == 3 * 240
    assert auto.provenance == {"num_train": 240} and influential_features(
        features, labels, 3, 4, provenance={"model": "m"}).provenance == {"num_train": 240, "model": "m"}


def test_the_cpu_kernel_serves_a_count_of_float32_16_and_bf16_features(monkeypatch):
    """The same histograms come from two paths; the fast one must serve what it can: the CPU kernel for float32,
    float16 and bfloat16 with an integer k (ranked by magnitude, or by value when nothing is negative), the torch
    path (topk / mass per chunk) for float64, fractions of mass and the value ranking of signed features."""
    from classfilters import influence
    calls = []
    topk, mass = influence.topk_indices, influence.mass_mask
    monkeypatch.setattr(influence, "topk_indices", lambda s, k: calls.append("torch") or topk(s, k))
    monkeypatch.setattr(influence, "mass_mask", lambda s, f: calls.append("torch") or mass(s, f))
    gen = torch.Generator().manual_seed(2)
    signed = torch.randn(60, 10, generator=gen)
    positive, labels = signed.abs() + 0.1, torch.arange(60) % 3
    cases = [(positive, 3, "auto", []), (signed, 3, "auto", []), (positive, 3, "value", []),
             (positive.half(), 3, "auto", []), (positive.bfloat16(), 3, "auto", []),
             (positive.double(), 3, "auto", ["torch"]), (positive, 0.5, "auto", ["torch"]),
             (signed, 3, "value", ["torch"])]
    for features, k, rank_by, path in cases:
        calls.clear()
        histograms, _ = class_histograms(features, labels, 3, k, rank_by)
        assert calls == path, (features.dtype, k, rank_by)
        assert histograms.dtype == torch.int64


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.filterwarnings("ignore:training features. 3 of 240 rows are all zero")  # beside the NaN refused
def test_zero_rows_and_bad_rows_are_named_in_both_paths(dtype):
    """All-zero rows are counted in a warning, and NaN rows refused, naming the features (kernel and torch path)."""
    features, labels = planted()
    features = features.to(dtype)
    features[[4, 9, 13]] = 0.0
    with pytest.warns(UserWarning, match=r"^training features: 3 of 240 rows are all zero; their top k is the first k"):
        influential_features(features, labels, 2, 2)
    with pytest.warns(UserWarning, match=r"^features: 3 of 240 rows are all zero"):
        class_histograms(features, labels, 6, 2)
    features[7, 1] = float("nan")
    with pytest.raises(ValueError, match=r"^training features: 1 rows hold NaN or inf \(first rows \[7\]\)"):
        influential_features(features, labels, 2, 2)


def test_bad_shapes_labels_and_sizes_are_named():
    features, labels = planted()
    with pytest.raises(ValueError, match=r"^training features: features must be \(N, D\), got shape \(240,\)"):
        influential_features(features[:, 0], labels, 2, 2)
    with pytest.raises(ValueError, match=r"^features: features must be \(N, D\)"):
        class_histograms(features[:, 0], labels, 6, 2)
    with pytest.raises(ValueError, match=r"k=0 is out of range"):
        class_histograms(features, labels, 6, 0)
    with pytest.raises(ValueError, match=r"must lie in \[0, 5\)"):  # a label 5 in a 5-class problem
        influential_features(features, labels, 2, 2, num_classes=5)


def test_the_zero_row_warning_is_said_in_full_and_points_at_the_users_call():
    """Whether the user calls `influential_features` or `class_histograms`, the warning names the features, the
    count and the advice, and its file and line are the user's call (not the library's internals, nor pytest's)."""
    features, labels = planted()
    features[[4, 9]] = 0.0
    said = ("features: 2 of 240 rows are all zero; their top k is the first k indices (ties go to the lower "
            "index), so the index sets partly reflect feature order, not the data. Check the model and the input "
            "(a dead layer, a wrong normalisation)")
    for dtype in (torch.float32, torch.float64):  # the CPU kernel and the torch path
        line = sys._getframe().f_lineno + 2
        with pytest.warns(UserWarning) as first:
            influential_features(features.to(dtype), labels, 2, 2)
        with pytest.warns(UserWarning) as second:
            class_histograms(features.to(dtype), labels, 6, 2)
        ours = [w for w in (*first, *second) if "rows are all zero" in str(w.message)]  # not a compiler's warning
        assert [str(w.message) for w in ours] == ["training " + said, said]
        if "mutmut" not in sys.modules:  # its trampolines are frames outside the package (the helper is not mutated)
            assert [(w.filename, w.lineno) for w in ours] == [(__file__, line), (__file__, line + 2)]


def test_class_histograms_refuses_a_count_above_the_number_of_features():
    features, labels = planted()
    with pytest.raises(ValueError, match=r"^k=33 is out of range: a count must lie between 1 and D=32"):
        class_histograms(features, labels, 6, 33)


def test_nothing_depends_on_the_default_device():
    """A user's `torch.set_default_device` (the meta device stands in for a GPU) changes no index set: counts and
    fractions of mass, the CPU kernel (float32) and the torch path (float64)."""
    from classfilters.influence import select_indices
    features, labels = planted()
    for dtype in (torch.float32, torch.float64):
        for k, k_prime in ((3, 3), (0.5, 0.8)):
            expected = influential_features(features.to(dtype), labels, k, k_prime)
            with torch.device("meta"):
                got = influential_features(features.to(dtype), labels, k, k_prime)
            assert got.indices == expected.indices and torch.equal(got.histograms, expected.histograms)
    mask, chosen = mass_mask(features, 0.5), select_indices(expected.histograms, 3)
    with torch.device("meta"):
        assert torch.equal(mass_mask(features, 0.5), mask) and select_indices(expected.histograms, 3) == chosen


def test_tied_mass_goes_to_the_lower_indices_in_wide_rows():
    """mass_mask keeps the fewest top entries reaching the fraction; among tied entries the lower indices, for
    rows wider than the sorts that happen to be stable anyway (64 equal entries: the first 32 reach half)."""
    scores = torch.ones(2, 64)
    scores[1, 40:] = 0.0                                             # 40 tied ones: the first 20 reach half
    mask = mass_mask(scores, 0.5)
    assert torch.equal(mask[0], torch.arange(64) < 32) and torch.equal(mask[1], torch.arange(64) < 20)


def test_class_histograms_names_the_features_it_was_given():
    with pytest.raises(ValueError, match=r"^test features: features must be \(N, D\), got shape \(4,\)"):
        class_histograms(torch.ones(4), torch.zeros(4, dtype=torch.long), 2, 1, what="test features")
