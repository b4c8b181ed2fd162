"""ChannelPrune (ExplainFix §4): zero the least salient spatial filters, then remove dead channels.

1. Saliency s[o, i] per spatial filter (saliency.py: "weight_grad" |W ⊙ ∇W|, the authors' library,
   or "grad" |∇W|, their paper runs), over the images of chosen classes.
2. Zeroing is global: the ⌊pct/100 · T⌋ least salient of all T spatial filters are set to 0
   (W[o, i, :, :] = 0). A layer left with no non-zero filter, or a group with no live channel, is an
   error (lower pct), unless keep_per_layer > 0 spares each layer's most salient filters and each
   group's strongest channel (our departure from the paper's purely global rule, for 99 %).
   "reset" then restores every filter that is neither in an all-zero row nor an all-zero column.
3. Physical pruning, on Torch-Pruning's dependency graph: a *group* is a set of coupled channels
   (a conv's outputs, the BatchNorms and residual adds they pass, and the inputs of every conv or
   linear reading them; concatenations are mapped by Torch-Pruning). Channel c of a group is removed
   when every producer of it is dead (all its conv/linear rows and biases zero, or a zero-padded
   shortcut channel) or every consumer ignores it (all conv/linear columns zero); channels named in
   `protect` are kept. The CIFAR option-A shortcut (subsample + zero-pad) is first replaced by the
   equivalent `EmbedShortcut` (y[:, o] = x[:, source[o], ::2, ::2], or 0 where source[o] = −1),
   which Torch-Pruning learns to prune through a custom pruner. Grouped convs that are not
   depthwise are refused.
4. Removing a channel whose producers are dead drops the constant BatchNorm gives it (the paper's
   "hallucinated" values): the smaller model computes exactly the function of `mask_prunable(model)`,
   the zeroed model with every removed parameter set to 0 (BN weight and bias included), which
   differs from the merely zeroed model only by those constants.
5. "FillZero" afterwards replaces every ≈0 weight of a spatial filter by N(mean, std) of its filter,
   and what is still ≈0 by U(±1/√fan_in). Fine-tune with `train.train_classifier`.

About 370 lines: zeroing, the option-A shortcut's equivalent module with its Torch-Pruning pruner,
and the physical removal form one pipeline whose steps share the group bookkeeping.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

from .data import ImageSplit
from .fixed_filters import check_has_spatial_convs, spatial_convs
from .models import ZeroPadShortcut
from .saliency import check_saliency_kind, filter_saliency

FILLS = ("none", "reset", "FillZero")


class EmbedShortcut(nn.Module):
    """y[:, o] = x[:, source[o], ::stride, ::stride] where source[o] >= 0, and 0 where source[o] = -1."""

    def __init__(self, source, in_channels: int, stride: int = 2):
        super().__init__()
        self.register_buffer("source", torch.as_tensor(source, dtype=torch.long))
        self.in_channels = in_channels
        self.stride = stride

    @classmethod
    def from_zero_pad(cls, shortcut: ZeroPadShortcut, in_channels: int) -> EmbedShortcut:
        extra = shortcut.extra
        return cls([-1] * (extra // 2) + list(range(in_channels)) + [-1] * (extra - extra // 2), in_channels)

    def forward(self, x):
        x = x[:, :, ::self.stride, ::self.stride]
        keep = (self.source >= 0).view(1, -1, 1, 1).to(x.dtype)
        return x.index_select(1, self.source.clamp(min=0)) * keep


def _embed_pruner():
    import torch_pruning as tp

    class EmbedShortcutPruner(tp.pruner.function.BasePruningFunc):
        def prune_out_channels(self, layer, idxs):
            gone = {int(i) for i in idxs}
            layer.source = layer.source[[o for o in range(len(layer.source)) if o not in gone]]
            return layer

        def prune_in_channels(self, layer, idxs):
            gone = {int(i) for i in idxs}
            renumber = {old: new for new, old in enumerate(i for i in range(layer.in_channels) if i not in gone)}
            layer.source = torch.tensor([renumber.get(int(s), -1) for s in layer.source], dtype=torch.long,
                                        device=layer.source.device)
            layer.in_channels = len(renumber)
            return layer

        def get_out_channels(self, layer):
            return len(layer.source)

        def get_in_channels(self, layer):
            return layer.in_channels

    return EmbedShortcutPruner()


def replace_zero_pad_shortcuts(model: nn.Module) -> nn.Module:
    """Swap every CIFAR ZeroPadShortcut for the equivalent EmbedShortcut (in place)."""
    for module in model.modules():
        for name, child in list(module.named_children()):
            if isinstance(child, ZeroPadShortcut):
                setattr(module, name, EmbedShortcut.from_zero_pad(child, module.conv1.in_channels))
    return model


def check_pct(pct: float) -> float:
    if isinstance(pct, bool) or not isinstance(pct, (int, float)) or not 0 < pct < 100:
        raise ValueError(f"pct must be a percentage of spatial filters strictly between 0 and 100, got {pct!r}")
    return float(pct)


def check_prunable(model: nn.Module) -> None:
    """Refuse grouped convs that are not depthwise (groups == in == out) and models without spatial convs."""
    check_has_spatial_convs(model)
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and m.groups > 1 and not (m.groups == m.in_channels == m.out_channels):
            raise ValueError(f"{name} is a grouped conv (groups={m.groups}, {m.in_channels}→{m.out_channels}) that is "
                             "not depthwise: channel pruning of grouped convs is not supported")


# ---------------------------------------------------------------------------------------------
# Zeroing


@torch.no_grad()
def zero_least_salient(model: nn.Module, saliency: dict[str, torch.Tensor], pct: float, fill: str = "none",
                       keep_per_layer: int = 0) -> dict:
    """Zero the pct % least salient spatial filters of the whole model (in place); with fill="reset",
    restore the filters outside all-zero rows and columns. Returns counts.

    A layer that would lose every filter is an error, unless `keep_per_layer` > 0: then each layer's
    `keep_per_layer` most salient filters are spared (a departure from the paper's purely global rule)."""
    check_pct(pct)
    if fill not in FILLS:
        raise ValueError(f"unknown fill {fill!r}: choose one of {FILLS}")
    convs = dict(spatial_convs(model))
    if set(saliency) != set(convs):
        raise ValueError("the saliency does not match the model's spatial convs: compute it with filter_saliency(model, ...)")
    names = list(saliency)
    spared = []
    for n in names:  # the most salient filters of each layer rank above every other filter
        s = saliency[n].reshape(-1).double().clone()
        if keep_per_layer:
            s[torch.topk(s, min(keep_per_layer, len(s))).indices] = float("inf")
        spared.append(s)
    flat = torch.cat(spared)
    count = math.floor(pct / 100 * len(flat))
    chosen = torch.zeros(len(flat), dtype=torch.bool)
    chosen[torch.argsort(flat, stable=True)[:count]] = True
    masks, start = {}, 0
    for n in names:
        size = saliency[n].numel()
        masks[n] = chosen[start:start + size].reshape(saliency[n].shape)
        start += size
        if masks[n].all():
            raise ValueError(f"zeroing {pct}% of the spatial filters would empty {n} (all its "
                             f"{size} filters are among the least salient): lower pct, or spare the most salient "
                             "filters of each layer with keep_per_layer=1")
    for n in names:
        w = convs[n].weight
        original = w.detach().clone()
        w[masks[n].to(w.device)] = 0
        if fill == "reset":
            nonzero = w.detach().abs().sum((2, 3)) != 0
            keep = nonzero.any(1)[:, None] & nonzero.any(0)[None, :]
            w[keep] = original[keep]
    zeroed = sum(int((convs[n].weight.detach().abs().sum((2, 3)) == 0).sum()) for n in names)
    return {"filters": len(flat), "zeroed": zeroed, "pct": pct}


# ---------------------------------------------------------------------------------------------
# Removal


def _dead_rows(weight, bias, idx):
    dead = weight[idx].flatten(1).abs().sum(1) == 0
    return dead & (bias[idx] == 0) if bias is not None else dead


def _channel_plan(group, graph, protect: dict) -> torch.Tensor:
    """Bool over the group's root channels: True where the channel can be removed."""
    n = len(group[0].idxs)
    producer_dead, consumer_ignores = torch.ones(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool)
    producers, consumers, keep = torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)

    def update(flags, seen, roots, values):
        flags[roots] &= values.cpu()
        seen[roots] = True

    for item in group.items:
        dep, module = item.dep, item.dep.target.module
        own = torch.tensor(item.idxs, dtype=torch.long)
        roots = torch.tensor(item.root_idxs, dtype=torch.long)
        out = graph.is_out_channel_pruning_fn(dep.handler)
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            w = module.weight.detach()
            depthwise = isinstance(module, nn.Conv2d) and module.groups > 1
            if out or depthwise:
                update(producer_dead, producers, roots, _dead_rows(w, module.bias, own.to(w.device)))
            if not out or depthwise:
                cols = (w[own.to(w.device)].flatten(1).abs().sum(1) == 0) if depthwise else \
                    (w[:, own.to(w.device)].transpose(0, 1).flatten(1).abs().sum(1) == 0)
                update(consumer_ignores, consumers, roots, cols)
                if module in protect:
                    keep[roots[torch.isin(own, torch.as_tensor(sorted(protect[module]), dtype=torch.long))]] = True
        elif isinstance(module, EmbedShortcut):
            if out:
                update(producer_dead, producers, roots, module.source[own.to(module.source.device)] < 0)
            else:
                update(consumer_ignores, consumers, roots, ~torch.isin(own, module.source.cpu()))
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            continue
        elif isinstance(module, nn.Module) and any(True for _ in module.parameters(recurse=False)):
            raise ValueError(f"cannot prune through {type(module).__name__} ({graph._module2name.get(module)}): only "
                             "convs, linear layers, BatchNorm and parameter-free ops are supported")
    return ((producer_dead & producers) | (consumer_ignores & consumers)) & ~keep


@torch.no_grad()
def _mask(group, graph, removed_roots: set[int]) -> None:
    for item in group.items:
        dep, module = item.dep, item.dep.target.module
        own = [i for i, r in zip(item.idxs, item.root_idxs) if r in removed_roots]
        if not own:
            continue
        out = graph.is_out_channel_pruning_fn(dep.handler)
        depthwise = isinstance(module, nn.Conv2d) and module.groups > 1
        rows = isinstance(module, nn.modules.batchnorm._BatchNorm) or (
            isinstance(module, (nn.Conv2d, nn.Linear)) and (out or depthwise))
        if rows:  # outputs (and a depthwise conv's filters): weight rows, bias; BatchNorm's affine parameters
            module.weight[own] = 0
            if module.bias is not None:
                module.bias[own] = 0
        elif isinstance(module, (nn.Conv2d, nn.Linear)):
            module.weight[:, own] = 0
        elif isinstance(module, EmbedShortcut):
            if out:
                module.source[own] = -1
            else:
                module.source[torch.isin(module.source, torch.tensor(own, device=module.source.device))] = -1


def _walk_groups(model: nn.Module, example: torch.Tensor, protect: dict | None, action: str,
                 keep_one_channel: bool = False) -> dict:
    import torch_pruning as tp

    check_prunable(model)
    replace_zero_pad_shortcuts(model)
    head = model.head if hasattr(model, "head") else None
    flags = {(id(m), name): p.requires_grad for m in model.modules() for name, p in m.named_parameters(recurse=False)}
    was_training = model.training
    graph = tp.DependencyGraph().build_dependency(model, example, customized_pruners={EmbedShortcut: _embed_pruner()},
                                                  verbose=False)
    removed_total, groups = 0, 0
    for group in graph.get_all_groups(ignored_layers=[head] if head is not None else [],
                                      root_module_types=[nn.Conv2d, nn.Linear]):
        plan = _channel_plan(group, graph, protect or {})
        groups += 1
        if plan.all():
            root_module = group[0].dep.target.module
            if not keep_one_channel:
                root = graph._module2name.get(root_module)
                raise ValueError(f"pruning would remove every channel of {root} (all its filters are zero or unread): "
                                 "lower pct, or keep each group's strongest channel (keep_one_channel=True; "
                                 "channel_prune(..., keep_per_layer=1))")
            plan[int(root_module.weight.detach().flatten(1).abs().sum(1).argmax())] = False
        roots = torch.nonzero(plan).flatten().tolist()
        if not roots:
            continue
        removed_total += len(roots)
        if action == "mask":
            _mask(group, graph, set(roots))
        else:
            group_root = group[0]
            graph.get_pruning_group(group_root.dep.target.module, group_root.dep.handler,
                                    [group_root.idxs[r] for r in roots]).prune()
    for m in model.modules():  # Torch-Pruning makes new Parameters: fixed filters must stay fixed
        for name, p in m.named_parameters(recurse=False):
            p.requires_grad_(flags.get((id(m), name), True))
    model.train(was_training)
    return {"groups": groups, "channels_removed": removed_total}


def mask_prunable(model: nn.Module, example: torch.Tensor, protect: dict | None = None,
                  keep_one_channel: bool = False) -> nn.Module:
    """A copy of `model` with every parameter `prune_channels` would remove set to 0: the function the
    physically smaller model computes."""
    names = _protect_by_name(model, protect)
    model = copy.deepcopy(model)
    _walk_groups(model, example, _protect_from_names(model, names), "mask", keep_one_channel)
    return model


def prune_channels(model: nn.Module, example: torch.Tensor, protect: dict | None = None,
                   keep_one_channel: bool = False) -> tuple[nn.Module, dict]:
    """A physically smaller copy of `model` without its dead channels, and counts.

    example: one input batch (shapes only). protect: {module of `model`: input-channel indices it must
    keep}, e.g. {model.head: influential features}. A group whose every channel is dead is an error,
    unless keep_one_channel (then its root's channel of largest weight stays)."""
    names = _protect_by_name(model, protect)
    model = copy.deepcopy(model)
    info = _walk_groups(model, example, _protect_from_names(model, names), "prune", keep_one_channel)
    return model, info


@torch.no_grad()
def fill_zero(model: nn.Module, seed: int = 0, atol: float = 1e-8) -> nn.Module:
    """FillZero: every ≈0 element of a spatial filter <- N(mean, std of its filter); then the still ≈0
    ones (filters that were all zero) <- U(±1/√fan_in). In place; fixed flags untouched."""
    gen = torch.Generator().manual_seed(seed)
    for _, conv in spatial_convs(model):
        w = conv.weight
        cpu = w.detach().cpu().double()
        near = torch.isclose(cpu, torch.zeros((), dtype=cpu.dtype), atol=atol, rtol=0)
        mean, std = cpu.mean((2, 3), keepdim=True), cpu.std((2, 3), keepdim=True).nan_to_num(0)
        draw = mean + std * torch.randn(cpu.shape, generator=gen, dtype=torch.float64)
        cpu = torch.where(near, draw, cpu)
        still = torch.isclose(cpu, torch.zeros((), dtype=cpu.dtype), atol=atol, rtol=0)
        bound = 1 / math.sqrt(cpu[0].numel())
        cpu = torch.where(still, (torch.rand(cpu.shape, generator=gen, dtype=torch.float64) * 2 - 1) * bound, cpu)
        w.copy_(cpu.to(w.dtype))
    return model


def macs_and_params(model: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    """(multiply-adds, parameters) of one forward pass on `example` (Torch-Pruning's counter)."""
    import contextlib
    import io

    import torch_pruning as tp
    with contextlib.redirect_stdout(io.StringIO()):  # its counter prints warnings about ptflops attributes
        macs, params = tp.utils.count_ops_and_params(model, example)
    return int(macs), int(params)


def channel_prune(model: nn.Module, split: ImageSplit, pct: float, saliency: str = "weight_grad",
                  classes: list[int] | None = None, fill: str = "none", protect: dict | None = None,
                  max_images: int | None = 2048, seed: int = 0, keep_per_layer: int = 0,
                  device=None) -> tuple[nn.Module, dict]:
    """ChannelPrune: saliency on `split` (images of `classes`), zero `pct` % of the spatial filters,
    remove the dead channels, optionally FillZero. Returns (smaller model on the CPU, report); `model`
    itself is not changed. Fine-tune the result with `train_classifier`."""
    check_pct(pct)
    check_saliency_kind(saliency)
    if fill not in FILLS:
        raise ValueError(f"unknown fill {fill!r}: choose one of {FILLS}")
    check_prunable(model)
    if split.images is None:
        raise ValueError("channel_prune needs an in-memory split (digits, CIFAR-10)")
    protect_names = _protect_by_name(model, protect)
    zeroed = copy.deepcopy(model).cpu()
    scores = filter_saliency(zeroed, split, saliency, classes, max_images, device=device)
    zeroed.cpu()
    counts = zero_least_salient(zeroed, scores, pct, "reset" if fill == "reset" else "none", keep_per_layer)
    example = split.normalize(split.images[:2])
    pruned, info = prune_channels(zeroed, example, _protect_from_names(zeroed, protect_names), keep_per_layer > 0)
    if fill == "FillZero":
        fill_zero(pruned, seed)
    before, after = macs_and_params(model.cpu().eval(), example), macs_and_params(pruned.eval(), example)
    report = {**counts, **info, "saliency": saliency, "fill": fill, "classes": classes,
              "macs_before": before[0], "macs_after": after[0], "params_before": before[1], "params_after": after[1],
              "spatial_filters_after": sum(c.weight[:, :, 0, 0].numel() for _, c in spatial_convs(pruned))}
    return pruned, report


def _protect_by_name(model: nn.Module, protect: dict | None) -> dict[str, set[int]]:
    names = {id(m): n for n, m in model.named_modules()}
    out = {}
    for module, idx in (protect or {}).items():
        if id(module) not in names:
            raise ValueError(f"protect names a {type(module).__name__} that is not part of the model")
        out[names[id(module)]] = {int(i) for i in idx}
    return out


def _protect_from_names(model: nn.Module, names: dict[str, set[int]]) -> dict:
    modules = dict(model.named_modules())
    return {modules[n]: idx for n, idx in names.items()}
