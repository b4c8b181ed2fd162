"""Two processes (torch.distributed, gloo on the CPU) give exactly what one process gives."""
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from classfilters import build_model, extract_features, influential_features, open_dataset


def _init(rank, world_size, store):
    """Join the group through a file store (no TCP port to pick, so no race for one)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)


def _leave():
    """Leave the group and exit at once: now and then gloo's threads abort the interpreter's
    teardown after the group is gone ("terminate called without an active exception")."""
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _worker(rank, world_size, store, weights, out, cache_dir):
    os.environ["CLASSFILTERS_CACHE"] = cache_dir
    _init(rank, world_size, store)
    model = build_model("resnet8", weights, num_classes=10, in_channels=1)
    split = open_dataset("digits", "test")
    features = extract_features(model, split, batch_size=50, device="cpu", progress=False)
    torch.save(features, f"{out}.{rank}")
    _leave()


@pytest.mark.parametrize("world_size", [2, 3])
def test_multi_process_extraction_equals_one_process(tmp_path, digits_model, world_size):
    weights = tmp_path / "resnet8.pt"
    torch.save(digits_model.body.model.state_dict(), weights)
    mp.spawn(_worker, args=(world_size, str(tmp_path / "store"), str(weights), str(tmp_path / "phi"), str(tmp_path / "cache")),
             nprocs=world_size, join=True)
    split = open_dataset("digits", "test")  # 360 images: slices of 120 or 180, never padded into the result
    single = extract_features(digits_model, split, batch_size=50, device="cpu", use_cache=False, progress=False)
    for rank in range(world_size):
        gathered = torch.load(tmp_path / f"phi.{rank}")
        assert gathered.shape == single.shape
        assert torch.allclose(gathered, single, atol=1e-5)
    assert influential_features(gathered, split.labels, 5, 5).indices == \
        influential_features(single, split.labels, 5, 5).indices


def _finetune_worker(rank, world_size, store, data, out):
    from torch import nn

    from classfilters import DecomposedHead, finetune_head
    _init(rank, world_size, store)
    features, labels, mask, weight, bias = torch.load(data)
    head = nn.Linear(weight.shape[1], weight.shape[0])
    head.weight.data, head.bias.data = weight.clone(), bias.clone()
    decomposed = DecomposedHead(head, mask)
    finetune_head(decomposed, features, labels, epochs=2, lr=1e-2, batch_size=37)
    torch.save({k: v.detach() for k, v in decomposed.state_dict().items()}, f"{out}.{rank}")
    _leave()


def test_ddp_finetuning_equals_one_process(tmp_path):
    from conftest import planted
    from torch import nn

    from classfilters import DecomposedHead, finetune_head
    features, labels = planted(strength=1.0)
    influence = influential_features(features, labels, 3, 3)
    torch.manual_seed(0)
    head = nn.Linear(32, 6)
    torch.save((features, labels, influence.mask, head.weight.detach(), head.bias.detach()), tmp_path / "data.pt")
    mp.spawn(_finetune_worker, args=(2, str(tmp_path / "store"), str(tmp_path / "data.pt"), str(tmp_path / "head")),
             nprocs=2, join=True)
    single = DecomposedHead(head, influence)
    finetune_head(single, features, labels, epochs=2, lr=1e-2, batch_size=37)  # 37: uneven shards on purpose
    for rank in range(2):
        state = torch.load(tmp_path / f"head.{rank}")
        assert not torch.equal(state["weight"], head.weight * influence.mask)  # it did train
        assert torch.allclose(state["weight"], single.weight, atol=1e-5)
        assert torch.allclose(state["bias"], single.bias, atol=1e-5)


def _train_worker(rank, world_size, store, out):
    from classfilters import Recipe, train_classifier
    _init(rank, world_size, store)
    torch.manual_seed(0)
    model = build_model("resnet8", num_classes=10, in_channels=1)
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, f"{out}.init.{rank}")
    train = open_dataset("digits", "train").subset(torch.arange(0, 1437, 3))
    train_classifier(model, train, Recipe(epochs=2, batch_size=64, lr=0.05, flip=False), device="cpu",
                     progress=False)
    torch.save(model.state_dict(), f"{out}.{rank}")
    _leave()


def test_ddp_training_keeps_ranks_identical_and_learns(tmp_path):
    mp.spawn(_train_worker, args=(2, str(tmp_path / "store"), str(tmp_path / "model")), nprocs=2, join=True)
    states = [torch.load(tmp_path / f"model.{r}") for r in range(2)]
    init = torch.load(tmp_path / "model.init.0")
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key  # DDP keeps every rank on the same weights
    assert not torch.equal(states[0]["body.model.conv1.weight"], init["body.model.conv1.weight"])
    model = build_model("resnet8", num_classes=10, in_channels=1)
    model.load_state_dict(states[0])
    test = open_dataset("digits", "test")
    phi = extract_features(model, test, use_cache=False, progress=False, device="cpu")
    assert (model.head(phi).argmax(1) == test.labels).float().mean() > 0.5


def test_command_line_under_torchrun_equals_one_process(tmp_path, digits_model):
    """`torchrun --nproc_per_node 2 -m classfilters ...` (gloo on the CPU) writes what one process writes, and
    only rank 0 writes (issue 16)."""
    import json
    import subprocess
    import sys
    weights = tmp_path / "resnet8.pt"
    torch.save(digits_model.body.model.state_dict(), weights)
    # each rank gets a cache and an output file of its own (the wrapper below), so that what rank 1 writes shows
    wrapper = tmp_path / "per_rank.py"
    wrapper.write_text(
        "import os, runpy, sys\n"
        "rank = os.environ.get('LOCAL_RANK', '0')\n"
        "os.environ['CLASSFILTERS_CACHE'] += '-rank' + rank\n"
        "sys.argv = ['classfilters', *sys.argv[1:-1], sys.argv[-1] + '.rank' + rank]\n"
        "runpy.run_module('classfilters', run_name='__main__')\n")
    args = ["--model", "resnet8", "--checkpoint", str(weights), "--dataset", "digits",
            "--k", "5", "--k-prime", "4", "--device", "cpu", "--batch-size", "50", "--out"]
    outputs = []
    for launcher in ([], ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]):
        out, cache = tmp_path / f"out{len(outputs)}.json", tmp_path / f"cache{len(outputs)}"
        env = {**os.environ, "CLASSFILTERS_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
        proc = subprocess.run([sys.executable, *launcher, str(wrapper), *args, str(out)], env=env, capture_output=True,
                              text=True, timeout=600, check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outputs.append(json.loads(Path(f"{out}.rank0").read_text()))
        # rank 0 alone writes: no JSON from rank 1, nothing on stdout, one summary line, no features in rank 1's cache
        assert not Path(f"{out}.rank1").exists() and proc.stdout == ""
        assert proc.stderr.count("resnet8 on digits: full") == 1
        assert len(list(Path(f"{cache}-rank0", "features").glob("*"))) == 2
        assert not list(Path(f"{cache}-rank1", "features").glob("*"))
    assert outputs[0]["indices"] == outputs[1]["indices"] and outputs[0]["histograms"] == outputs[1]["histograms"]
    assert outputs[0]["test"] == pytest.approx(outputs[1]["test"])


def _uneven_worker(rank, world_size, store, out):
    """Rank 0 runs out of memory above 16 images, rank 1 never; 449 images in batches of 64 leave a
    last batch of one image (rank 0 gets none). Both must still run the same passes."""
    import datetime

    from classfilters import Recipe, train_classifier
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=120))  # a mismatch fails instead of hanging
    torch.manual_seed(0)
    model = build_model("resnet8", num_classes=10, in_channels=1)
    forward, sizes = model.forward, []

    def small_memory(x):
        sizes.append(len(x))
        if rank == 0 and len(x) > 16:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(x)

    model.forward = small_memory
    train = open_dataset("digits", "train").subset(torch.arange(449))
    train_classifier(model, train, Recipe(epochs=2, batch_size=64, lr=0.05, flip=False), device="cpu",
                     progress=False)
    del model.forward
    torch.save((model.state_dict(), sizes), f"{out}.{rank}")
    _leave()


def test_ddp_out_of_memory_on_one_rank_and_a_last_batch_smaller_than_the_ranks(tmp_path):
    mp.spawn(_uneven_worker, args=(2, str(tmp_path / "store"), str(tmp_path / "model")), nprocs=2, join=True)
    (state0, sizes0), (state1, sizes1) = (torch.load(tmp_path / f"model.{r}") for r in range(2))
    passes = [[s for s in sizes if s <= 16] for sizes in (sizes0, sizes1)]
    assert len(passes[0]) == len(passes[1])  # the same number of forward (and backward) passes on both ranks
    assert sizes0.count(32) == 1 and 0 in sizes0 and max(sizes1) == 32  # rank 0 backed off; got an empty chunk
    for key in state0:
        assert torch.equal(state0[key], state1[key]), key
    model = build_model("resnet8", num_classes=10, in_channels=1)
    model.load_state_dict(state0)
    test = open_dataset("digits", "test")
    phi = extract_features(model, test, use_cache=False, progress=False, device="cpu")
    assert (model.head(phi).argmax(1) == test.labels).float().mean() > 0.2  # it learns (one process: 0.39)

