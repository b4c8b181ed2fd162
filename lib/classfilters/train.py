"""Training on in-memory uint8 splits: CIFAR ResNets from scratch, and the decomposed head.

`train_classifier` runs SGD + Nesterov with a one-cycle schedule (or, `Recipe(optimizer="adam")`, Adam
at a constant rate: the authors' fine-tuning) over whole uint8 batches held on the device, with
random-crop (and optionally flip) augmentation done on the batch (no DataLoader), the forward pass
under bf16 autocast where the recipe's precision says so ("auto": GPUs and CPUs with native bf16;
device.py). `trained_model` caches the result under a key of the model name, the split's fingerprint,
the recipe, the precision it resolved to, the seed and
`training_key` (the model's forward code, this file's source, torch and torchvision), so profiles never
train the same model twice and an edit of the training or model code never returns weights the old
code made. With `Recipe(compile=True)` every step sees a batch of exactly `batch_size` images (the
epoch's last batch is topped up from the start of its order), so a compiled network, CUDA graphs
included, is compiled once. `finetune_head` retrains a `DecomposedHead` from cached features (Adam, lr
1e-4, as the authors), recording accuracy after every epoch, on one process or many (DDP).

About 310 lines: the training loop's device, DDP, micro-batch (out of memory) and compile paths share
one step function and one cache key, and are kept with it.
"""
from __future__ import annotations

import contextlib
import gc
import sys
from dataclasses import asdict
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from . import cache
from .data import ImageSplit
from .decomposed import DecomposedHead, accuracy
from .device import default_device, training_precision, world
from .features import library_versions
from .models import FeatureModel, build_model
from .progress import tqdm
from .recipe import Recipe


def augment(images: torch.Tensor, padding: int, flip: bool, gen: torch.Generator) -> torch.Tensor:
    """Random crops (zero padding) and flips of a whole uint8 batch, one draw per image, drawn
    from `gen` on its device (on the GPU no step waits for the host)."""
    n, _, h, w = images.shape
    if padding:
        padded = F.pad(images, (padding,) * 4)
        dy = torch.randint(0, 2 * padding + 1, (n,), generator=gen, device=gen.device).to(images.device)
        dx = torch.randint(0, 2 * padding + 1, (n,), generator=gen, device=gen.device).to(images.device)
        rows = (dy[:, None] + torch.arange(h, device=images.device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=images.device))[:, None, None, :]
        images = padded[torch.arange(n, device=images.device)[:, None, None, None],
                        torch.arange(images.shape[1], device=images.device)[None, :, None, None], rows, cols]
    if flip:
        flips = (torch.rand(n, generator=gen, device=gen.device) < 0.5).to(images.device)
        images = torch.where(flips[:, None, None, None], images.flip(3), images)
    return images


def one_cycle(opt: torch.optim.Optimizer, lr: float, steps: int):
    """The one-cycle schedule (a quarter warm-up) over `steps`; a constant `lr` for runs under 8
    steps, too short to warm up (OneCycleLR divides by zero on an empty warm-up phase)."""
    if steps >= 8:
        return torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.25)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)


def train_classifier(model: nn.Module, split: ImageSplit, recipe: Recipe | None = None, device=None,
                     seed: int = 0, progress: bool = True) -> nn.Module:
    """Train in place and return `model` in eval mode.

    Under torchrun each rank takes its share of every batch of one shared order, the model is
    wrapped in DistributedDataParallel (BatchNorm synchronised on GPUs) and the loss is scaled
    so that the averaged gradient is the whole batch's. Out of GPU memory, a step is redone in
    micro-batches of half the size (gradients accumulated), and training goes on, saying so.
    """
    recipe = recipe or Recipe()
    if split.images is None:
        raise ValueError("train_classifier needs an in-memory split (digits, CIFAR-10)")
    device = torch.device(device) if device is not None else default_device()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    rank, size = world()
    augment_gen = gen if size == 1 else torch.Generator().manual_seed(seed * 1000 + rank + 1)
    if device.type == "cuda":
        augment_gen = torch.Generator(device=device).manual_seed(seed * 1000 + rank + 1)
    model.to(device, memory_format=torch.channels_last).train()  # faster convolutions on CPUs too
    net = ddp = model
    if size > 1:
        from torch.nn.parallel import DistributedDataParallel
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        # no buffer broadcast in forward (a collective a rank out of memory would miss): rank 0's
        # BatchNorm statistics are broadcast once, at the end (training uses the batch's statistics)
        net = ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                            forward_sync_buffers=False)
    if recipe.compile and recipe.batch_size < size:
        raise ValueError(f"batch_size {recipe.batch_size} is smaller than the {size} processes: every rank needs images")
    eager = net
    cudagraphs = recipe.compile and device.type == "cuda"
    if recipe.compile:
        net = torch.compile(net, mode="reduce-overhead" if cudagraphs else None)
        eager = eager if cudagraphs else net  # without CUDA graphs the compiled network serves every size
    images, labels = split.images.to(device), split.labels.to(device)
    steps_per_epoch = -(-len(split) // recipe.batch_size)
    trainable = [p for p in model.parameters() if p.requires_grad]  # fixed (frozen) weights stay bit-identical
    if not trainable:
        raise ValueError("the model has no trainable parameter (every requires_grad is False): nothing to train")
    if recipe.optimizer == "adam":  # the authors' fine-tuning: Adam at a constant rate
        opt = torch.optim.Adam(trainable, lr=recipe.lr, weight_decay=recipe.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    else:
        opt = torch.optim.SGD(trainable, lr=recipe.lr, momentum=0.9, nesterov=True, weight_decay=recipe.weight_decay)
        sched = one_cycle(opt, recipe.lr, recipe.epochs * steps_per_epoch)
    bf16 = training_precision(recipe.precision, device) == "bf16"
    padding = recipe.crop_padding if recipe.crop_padding is not None else images.shape[-1] // 8
    micro = recipe.batch_size
    bar = tqdm(range(recipe.epochs), desc=f"train {getattr(model, 'name', type(model).__name__)}",
               disable=not progress or rank != 0, unit="epoch")
    for _ in bar:
        stats = torch.zeros(3, device=device)  # this rank's loss sum, correct, seen: read once per epoch
        perm = torch.randperm(len(split), generator=gen).to(device)
        for start in range(0, len(split), recipe.batch_size):
            batch = perm[start:start + recipe.batch_size]
            if recipe.compile and len(batch) < recipe.batch_size:  # one shape: compiled (and graphed) once
                batch = torch.cat([batch, perm.repeat(-(-recipe.batch_size // len(perm)))[:recipe.batch_size - len(batch)]])
            mine = batch[len(batch) * rank // size:len(batch) * (rank + 1) // size]
            x = split.normalize(augment(images[mine], padding, recipe.flip, augment_gen))
            x = x.contiguous(memory_format=torch.channels_last)
            if recipe.compile:
                torch.compiler.cudagraph_mark_step_begin()  # a new step: the last step's graph outputs are done
            # CUDA graphs replayed for micro-batches would accumulate gradients across replays (wrong
            # or overwritten): a chunk smaller than the rank's batch runs eagerly, and so do later steps
            micro = step_in_micro_batches(opt, x, labels[mine], micro, partial(
                _chunk_loss, net if cudagraphs else eager, eager, len(x), weight=size / len(batch),
                smoothing=recipe.label_smoothing, bf16=bf16, stats=stats if not bar.disable else None),
                ddp=ddp if size > 1 else None)
            if cudagraphs and micro < len(x):
                cudagraphs = False
                tqdm.write("CUDA graphs do not mix with micro-batches: going on eagerly, without graphs",
                           file=sys.stderr)
            sched.step()
        if not bar.disable:  # the epoch's running loss and accuracy on the augmented batches (rank 0's share)
            loss, correct, seen = stats.tolist()
            bar.set_postfix(loss=f"{loss / max(seen, 1):.3f}", train_acc=f"{correct / max(seen, 1):.3f}")
    if size > 1:  # every rank ends with rank 0's BatchNorm statistics: one model, whichever rank saves it
        import torch.distributed as dist
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)
        # DDP's reducer sits in a reference cycle: collected at exit, after the caller destroyed the
        del net, eager, ddp  # process group, it aborts the process ("terminate called without an active exception")
        gc.collect()
    return model.eval()


def _chunk_loss(graphed, eager, whole: int, x, y, weight: float, smoothing: float, bf16: bool,
                stats=None) -> torch.Tensor:
    """Cross-entropy (in float32) summed over the chunk, times `weight` (1 / the whole batch, times the
    ranks). `graphed` runs a chunk of the rank's `whole` batch, `eager` a smaller one (a micro-batch).
    `stats` (3,), when given, accumulates the loss sum, the correct predictions and the images seen."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = (graphed if len(x) == whole else eager)(x)
    loss = F.cross_entropy(logits.float(), y, label_smoothing=smoothing, reduction="sum")
    if stats is not None:
        with torch.no_grad():
            stats += torch.stack([loss.detach(), (logits.argmax(1) == y).sum().float(),
                                  torch.tensor(float(len(y)), device=stats.device)])
    return loss * weight


def step_in_micro_batches(opt, x, y, micro: int, chunk_loss, extra_loss=None, ddp=None) -> int:
    """One optimiser step on the batch (x, y): `chunk_loss(x_part, y_part)` over micro-batches of
    at most `micro` (gradients accumulated; each chunk's loss carries its share of the batch), plus
    `extra_loss()` once. Out of GPU memory, halve `micro`, redo the step (after the `except` block, so
    the failed pass is freed first) and say so. Returns `micro` (the next step starts from it).

    Under DistributedDataParallel (`ddp`: the wrapped model) every rank runs the same number of
    passes, or the ranks would wait for each other forever: they agree on the number of chunks
    (the most any rank needs; a rank with fewer images runs empty chunks, which weigh nothing),
    every backward stays local (`no_sync`), the ranks agree whether any ran out of memory (then
    all redo the step with half the micro-batch), and one all-reduce averages the gradients."""
    while True:
        chunks = _agreed(-(-len(x) // micro), ddp)
        failed = False
        try:
            opt.zero_grad(set_to_none=True)
            with ddp.no_sync() if ddp is not None else contextlib.nullcontext():
                for xs, ys in zip(x.tensor_split(chunks), y.tensor_split(chunks)):
                    chunk_loss(xs, ys).backward()
                if extra_loss is not None:
                    extra_loss().backward()
        except torch.cuda.OutOfMemoryError:
            if micro == 1 and ddp is None:
                raise
            failed = True
        if not _agreed(int(failed), ddp):
            if ddp is not None:
                _average_gradients(opt)
            opt.step()
            return micro
        opt.zero_grad(set_to_none=True)  # the failed pass is gone: free its blocks, then retry smaller
        if micro == 1:
            raise torch.cuda.OutOfMemoryError("out of GPU memory with micro-batches of one image (on some rank)")
        micro = max(1, _agreed(min(micro, len(x)), ddp) // 2)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        tqdm.write(f"out of GPU memory: going on with micro-batches of {micro} (gradients accumulated)",
                   file=sys.stderr)


def _agreed(value: int, ddp) -> int:
    """The largest `value` of all ranks (under DDP), else `value`."""
    if ddp is None:
        return value
    import torch.distributed as dist
    t = torch.tensor([value], device=next(ddp.parameters()).device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, dist.ReduceOp.MAX)
    return int(t.item())


def _average_gradients(opt) -> None:
    """Every parameter's gradient averaged over the ranks (what DDP's backward does), in one all-reduce."""
    import torch.distributed as dist
    params = [p for group in opt.param_groups for p in group["params"]]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    on_cpu = dist.get_backend() != "nccl"
    reduced = flat.cpu() if on_cpu else flat
    dist.all_reduce(reduced)
    reduced = reduced.to(flat.device) / dist.get_world_size()
    for p, g in zip(params, reduced.split([p.numel() for p in params])):
        p.grad.copy_(g.view_as(p.grad))


SOURCE_DIGEST = cache.source_digest(sys.modules[__name__])  # read once, at import: the code this process runs


def training_key(model: nn.Module, *sources: str) -> dict:
    """What trained weights depend on besides data, recipe and seed: the model's forward code (every submodule's
    class, source and settings), the training code (this module's SOURCE_DIGEST and `sources`, the digests of
    other modules that train, e.g. csg's), torch and torchvision. A whole file is hashed: any edit of it
    retrains, which costs time but never returns weights that other code made."""
    return {"forward": cache.code_identity(model), "training": "|".join((SOURCE_DIGEST, *sources)),
            "versions": library_versions()}


def trained_model(name: str, split: ImageSplit, recipe: Recipe | None = None, seed: int = 0, device=None,
                  progress: bool = True) -> FeatureModel:
    """`build_model(name)` trained on `split` with `recipe`, from the cache when done before."""
    recipe = recipe or Recipe()
    in_channels = split.images.shape[1]
    torch.manual_seed(seed)  # the initial weights are part of the recipe: same seed, same model
    model = build_model(name, num_classes=split.num_classes, in_channels=in_channels)
    key = {"model": name, "data": split.fingerprint, "recipe": asdict(recipe),
           "precision": training_precision(recipe.precision, device), "seed": seed,
           "init": "seeded", "loss": "sum-scaled", "memory_format": "channels_last",
           "in_channels": in_channels, "classes": split.num_classes, **training_key(model)}
    if (state := cache.load("models", key)) is not None:
        model.load_state_dict(state)
        return model.eval()
    train_classifier(model, split, recipe, device, seed, progress)
    cache.save("models", key, {k: v.detach().cpu().clone() for k, v in model.state_dict().items()})  # clone: head and body share the linear layer
    return model.cpu().eval()


def finetune_network(model: FeatureModel, influence, split: ImageSplit, recipe: Recipe | None = None, device=None,
                     seed: int = 0, progress: bool = True) -> FeatureModel:
    """§5.2.3 on the whole network: the head replaced by its decomposition (masked weights that
    stay masked), then body and head trained together by `train_classifier` (data and
    augmentation on the device). Returns `model`, in eval mode, with the `DecomposedHead`."""
    model.head = DecomposedHead(model.head, influence)
    return train_classifier(model, split, recipe, device, seed, progress)


def finetune_head(head: DecomposedHead, features: torch.Tensor, labels: torch.Tensor, epochs: int = 1,
                  lr: float = 1e-4, batch_size: int = 128, seed: int = 0, eval_features=None,
                  eval_labels=None) -> list[dict]:
    """Adam on the decomposed head alone (the mask stays applied); accuracy after each epoch.

    Under torchrun every rank holds all the features and takes its share of each batch; the
    head is wrapped in DistributedDataParallel and each rank's loss is scaled so that the
    averaged gradient is exactly the whole batch's: the result equals one process's.
    """
    gen = torch.Generator().manual_seed(seed)
    rank, size = world()
    model = head
    if size > 1:
        from torch.nn.parallel import DistributedDataParallel
        model = DistributedDataParallel(head, device_ids=[head.weight.device.index] if head.weight.is_cuda else None)
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    labels = labels.long()
    device = head.weight.device
    history = []

    def record(epoch):
        row = {"epoch": epoch, "train_acc": accuracy(head(features.to(device)), labels)}
        if eval_features is not None:
            row["test_acc"] = accuracy(head(eval_features.to(device)), eval_labels)
        history.append(row)

    with torch.no_grad():
        record(0)
    for epoch in range(1, epochs + 1):
        perm = torch.randperm(len(labels), generator=gen)  # the same order on every rank
        for start in range(0, len(labels), batch_size):
            batch = perm[start:start + batch_size]
            mine = batch[len(batch) * rank // size:len(batch) * (rank + 1) // size]
            logits = model(features[mine].to(device))
            loss = F.cross_entropy(logits, labels[mine].to(device), reduction="sum") * (size / len(batch))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            record(epoch)
    if size > 1:
        del model
        gc.collect()  # see the end of train_classifier
    return history
