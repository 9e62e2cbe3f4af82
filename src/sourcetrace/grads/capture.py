"""Per-example gradients without a per-example loop.

Supported layers (`nn.Linear`, `nn.Conv2d`, `nn.Embedding`, transformers' `Conv1D`, and the weights of
LayerNorm / RMSNorm layers, so that a Llama's norms need no per-example loop) are handled by hooks:
the forward hook keeps the layer input, a tensor hook on the output keeps the output gradient, and the
per-example weight gradient is formed per layer from the two (summed over sequence/spatial positions).
Every other selected parameter goes through a `torch.func` fallback (functional_call + vmap + grad), or a
plain loop where vmap cannot trace the model. On the first batch, the sum of the per-example gradients is
checked against the ordinary batch gradient, so a weight also used outside its layer (e.g. by a functional
call) is moved to the fallback rather than silently getting a partial gradient.
"""

from __future__ import annotations

import contextlib
import fnmatch
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils._pytree import tree_map

from ..errors import UnsupportedModuleError

PerExampleFn = Callable[[nn.Module, Any], torch.Tensor]


def is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers")


def is_norm(module: nn.Module) -> bool:
    """An elementwise-affine normalisation over the last axis: LayerNorm, RMSNorm, Llama's RMSNorm."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        return False
    if isinstance(module, nn.LayerNorm):
        return len(module.normalized_shape) == 1
    return isinstance(module, nn.RMSNorm) or (type(module).__name__.endswith("RMSNorm")
                                              and hasattr(module, "variance_epsilon"))


def _normalized(module: nn.Module, a: torch.Tensor) -> torch.Tensor:
    """x̂ of a norm layer's input (its output is w ⊙ x̂ (+ b)), computed as the layer computes it."""
    if isinstance(module, nn.LayerNorm):
        return F.layer_norm(a, module.normalized_shape, None, None, module.eps)
    if isinstance(module, nn.RMSNorm):
        eps = module.eps if module.eps is not None else torch.finfo(a.dtype).eps
        return a * torch.rsqrt(a.pow(2).mean(-1, keepdim=True) + eps)
    x = a.to(torch.float32)  # Llama-style RMSNorm normalises in float32
    eps = float(cast(float, module.variance_epsilon))
    return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).to(a.dtype)


def hookable(module: nn.Module) -> bool:
    """Whether hooks can form this layer's per-example gradients."""
    if isinstance(module, nn.Linear) or is_conv1d(module) or is_norm(module):
        return True
    if isinstance(module, nn.Conv2d):
        return module.groups == 1 and module.padding_mode == "zeros" and not isinstance(module.padding, str)
    if isinstance(module, nn.Embedding):
        return module.max_norm is None and not module.scale_grad_by_freq and not module.sparse
    return False


def _layer_grads(module: nn.Module, a: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-example gradients of a hookable layer's parameters from its input `a` and output gradient `g`."""
    if is_norm(module):  # y = w ⊙ x̂ + b: the weight's gradient is Σ_t g_t ⊙ x̂_t
        b, d = g.shape[0], g.shape[-1]
        out = {"weight": (g * _normalized(module, a).to(g.dtype)).reshape(b, -1, d).sum(1)}
        if getattr(module, "bias", None) is not None:
            out["bias"] = g.reshape(b, -1, d).sum(1)
        return out
    if isinstance(module, nn.Linear):
        out = {"weight": torch.einsum("b...o,b...i->boi", g, a)}
        if module.bias is not None:
            out["bias"] = g.reshape(g.shape[0], -1, g.shape[-1]).sum(1)
        return out
    if is_conv1d(module):  # y = x @ W + b with W of shape [in, out]
        out = {"weight": torch.einsum("b...i,b...o->bio", a, g)}
        if module.bias is not None:
            out["bias"] = g.reshape(g.shape[0], -1, g.shape[-1]).sum(1)
        return out
    if isinstance(module, nn.Conv2d):
        padding: Any = module.padding  # never a string here: hookable() sends string padding to the fallback
        cols = F.unfold(a, module.kernel_size, dilation=module.dilation, padding=padding,
                        stride=module.stride)  # [B, C_in*kh*kw, L]
        g2 = g.reshape(g.shape[0], g.shape[1], -1)  # [B, C_out, L]
        out = {"weight": torch.einsum("bol,bil->boi", g2, cols).reshape(g.shape[0], *module.weight.shape)}
        if module.bias is not None:
            out["bias"] = g2.sum(2)
        return out
    if isinstance(module, nn.Embedding):
        b, d = g.shape[0], g.shape[-1]
        ids = a.reshape(b, -1)
        grad = torch.zeros(b, module.num_embeddings, d, dtype=g.dtype, device=g.device)
        grad.scatter_add_(1, ids[..., None].expand(-1, -1, d), g.reshape(b, -1, d))
        if module.padding_idx is not None:
            grad[:, module.padding_idx] = 0
        return {"weight": grad}
    raise TypeError(type(module).__name__)


def select_parameters(model: nn.Module, modules: Sequence[str] | str | None) -> dict[str, nn.Parameter]:
    """Trainable parameters of the modules whose names match a pattern (fnmatch), or all of them."""
    if isinstance(modules, str):
        modules = [modules]
    chosen: dict[str, nn.Parameter] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        owner = name.rsplit(".", 1)[0] if "." in name else ""
        parts = owner.split(".") if owner else []
        prefixes = [".".join(parts[:k]) for k in range(1, len(parts) + 1)] or [""]
        if modules is None or any(fnmatch.fnmatchcase(pre, pat) for pre in prefixes for pat in modules):
            chosen[name] = p
    return chosen


class GradientCapture:
    """Per-example gradients of a per-example function (a loss or a measurement) for chosen parameters.

    `modules`: fnmatch patterns of module names whose parameters are included (default: all trainable
    parameters). `fallback`: whether parameters outside supported layers go through torch.func; if False,
    such parameters raise `UnsupportedModuleError`.
    """

    def __init__(self, model: nn.Module, modules: Sequence[str] | str | None = None, fallback: bool = True):
        self.model = model
        self.params = select_parameters(model, modules)
        if not self.params:
            raise UnsupportedModuleError(f"no trainable parameters match modules={modules!r}; "
                                         "check the names with model.named_modules()")
        by_id = {id(p): n for n, p in self.params.items()}
        # every hookable module whose parameters are selected; a tied weight may have several
        self.layers: dict[str, nn.Module] = {}
        self.owner: dict[tuple[str, str], str] = {}  # (module name, local param) -> parameter name
        for mname, m in model.named_modules(remove_duplicate=False):
            if not hookable(m):
                continue
            local = {k: v for k, v in m.named_parameters(recurse=False) if id(v) in by_id}
            if local:
                self.layers[mname] = m
                for k, v in local.items():
                    self.owner[(mname, k)] = by_id[id(v)]
        hooked = set(self.owner.values())
        self.fallback_names = [n for n in self.params if n not in hooked]
        self.fallback = fallback
        if self.fallback_names and not fallback:
            raise UnsupportedModuleError(
                f"no per-layer gradient capture for {self.fallback_names[:5]} "
                f"({len(self.fallback_names)} parameters of unsupported modules); pass fallback=True to use "
                "torch.func for them, or leave them out with modules=[...]")
        self.shapes = {n: tuple(p.shape) for n, p in self.params.items()}
        self.dim = sum(p.numel() for p in self.params.values())
        self._verified = False
        self._vmap_ok = True

    # ---- the public surface -------------------------------------------------------------------------
    def per_example(self, fn: PerExampleFn, batch: Any) -> dict[str, torch.Tensor]:
        """Gradients of each example's value of `fn(model, batch)`: {parameter name: [B, *shape]}."""
        grads, unbatched = self._hooked(fn, batch)
        if unbatched:  # e.g. position embeddings looked up once for the whole batch
            self._to_fallback(unbatched)
            grads = {n: g for n, g in grads.items() if n not in unbatched}
        if not self._verified:
            self._verify(grads, batch)
        if self.fallback_names:
            grads.update(self._functional(fn, batch, self.fallback_names))
        return {n: grads[n].detach() for n in self.params}

    def flat(self, fn: PerExampleFn, batch: Any) -> torch.Tensor:
        """Per-example gradients as one vector per example, [B, dim], in `self.params` order."""
        grads = self.per_example(fn, batch)
        b = next(iter(grads.values())).shape[0]
        return torch.cat([grads[n].reshape(b, -1) for n in self.params], dim=1)

    # ---- hooks ---------------------------------------------------------------------------------------
    def layer_io(self, fn: PerExampleFn, batch: Any
                 ) -> tuple[dict[str, list[tuple[torch.Tensor, torch.Tensor]]], torch.Tensor]:
        """Run `fn` forward and backward; return each hooked layer's (input, output gradient) per call.

        The raw material of per-layer curvature (K-FAC covariances) and per-layer projections (LoGra):
        `{layer name: [(a [B, ..., in], g [B, ..., out]), ...]}` plus the per-example values of `fn`.
        """
        from ..tasks import checked

        inputs: dict[str, list[torch.Tensor]] = defaultdict(list)
        outgrads: dict[str, dict[int, torch.Tensor]] = defaultdict(dict)
        handles = []

        def forward_hook(name: str):
            def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
                if not isinstance(output, torch.Tensor) or not output.requires_grad:
                    return
                call = len(inputs[name])
                inputs[name].append(args[0].detach())

                def keep(g: torch.Tensor) -> None:
                    outgrads[name][call] = g.detach()

                output.register_hook(keep)
            return hook

        for name, m in self.layers.items():
            handles.append(m.register_forward_hook(forward_hook(name)))
        wanted = [p for n, p in self.params.items() if n not in self.fallback_names]
        try:
            with torch.enable_grad():
                values = fn(self.model, batch)
                checked(values, batch_size(batch), "the per-example function")
                batch_grads = torch.autograd.grad(values.sum(), wanted, allow_unused=True) if wanted else ()
        finally:
            for h in handles:
                h.remove()
        self._last_batch_grads = dict(zip([n for n in self.params if n not in self.fallback_names],
                                          batch_grads))
        io = {name: [(a, outgrads[name][call]) for call, a in enumerate(inputs[name])
                     if call in outgrads[name]]
              for name in self.layers}
        return io, values

    def _hooked(self, fn: PerExampleFn, batch: Any) -> tuple[dict[str, torch.Tensor], set[str]]:
        io, values = self.layer_io(fn, batch)
        b = values.shape[0]
        grads: dict[str, torch.Tensor] = {}
        unbatched: set[str] = set()
        for name, m in self.layers.items():
            keys = {local: self.owner.get((name, local)) for local, _ in m.named_parameters(recurse=False)}
            for a, g in io[name]:
                if a.shape[0] != b or g.shape[0] != b:
                    unbatched.update(k for k in keys.values() if k is not None)
                    continue
                for local, grad in _layer_grads(m, a, g).items():
                    key = keys[local]
                    if key is None or key in self.fallback_names:
                        continue
                    grads[key] = grads[key] + grad if key in grads else grad
        for n in self.params:
            if n not in self.fallback_names and n not in grads:  # selected but unused by this function
                grads[n] = torch.zeros(b, *self.shapes[n], dtype=values.dtype, device=values.device)
        return grads, unbatched

    def _to_fallback(self, names: set[str] | list[str]) -> None:
        if not self.fallback:
            raise UnsupportedModuleError(
                f"hooks cannot capture per-example gradients of {sorted(names)[:5]} (used outside their "
                "layers, or on inputs without a batch axis); pass fallback=True or leave them out with "
                "modules=[...]")
        self.fallback_names = [n for n in self.params if n in set(self.fallback_names) | set(names)]

    def _verify(self, grads: dict[str, torch.Tensor], batch: Any) -> None:
        """Move parameters whose hook gradients miss part of the batch gradient to the fallback."""
        self._verified = True
        moved = []
        for n, full in self._last_batch_grads.items():
            if full is None or n not in grads:
                continue
            summed = grads[n].sum(0)
            tol = 1e-3 if full.dtype in (torch.float16, torch.bfloat16) else 1e-5
            scale = full.abs().max().clamp_min(1e-12)
            if (summed - full).abs().max() > tol * scale * max(1, grads[n].shape[0]) ** 0.5 + 1e-30:
                moved.append(n)
        if moved:
            self._to_fallback(moved)
            warnings.warn(f"{moved[:5]} are used outside their layers; using torch.func for them",
                          stacklevel=3)

    # ---- torch.func fallback -------------------------------------------------------------------------
    def _functional(self, fn: PerExampleFn, batch: Any, names: list[str]) -> dict[str, torch.Tensor]:
        from torch.func import grad, vmap

        model = self.model
        params = {n: self.params[n].detach() for n in names}

        def one(p: dict[str, torch.Tensor], example: Any) -> torch.Tensor:
            single = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, torch.Tensor) else t, example)
            return call_with(model, p, fn, single)[0]

        if self._vmap_ok:
            try:
                return vmap(grad(one), in_dims=(None, 0), randomness="same")(params, batch)
            except (RuntimeError, NotImplementedError, ValueError) as exc:
                self._vmap_ok = False
                warnings.warn(f"vmap could not trace this model ({str(exc)[:120]}); using a per-example "
                              "loop for the fallback parameters (slower, same result)", stacklevel=3)
        rows = []
        for i in range(batch_size(batch)):
            example = tree_map(lambda t, i=i: t[i] if isinstance(t, torch.Tensor) else t, batch)
            rows.append(grad(one)(params, example))
        return {n: torch.stack([r[n] for r in rows]) for n in names}


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode (no dropout: the same function at every call), left as it was after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def call_with(model: nn.Module, params: dict[str, torch.Tensor], fn: PerExampleFn, batch: Any
              ) -> torch.Tensor:
    """`fn(model, batch)` with the model's parameters replaced by `params` (for torch.func)."""
    from torch.nn.utils.stateless import _reparametrize_module

    with _reparametrize_module(model, params, tie_weights=True, strict=False):
        return fn(model, batch)


def batch_size(batch: Any) -> int:
    leaves = [t for t in torch.utils._pytree.tree_leaves(batch) if isinstance(t, torch.Tensor)]
    return int(leaves[0].shape[0])
