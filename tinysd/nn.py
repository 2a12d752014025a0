"""Modules, parameters, and the generic state-dict walk.

A model is a tree of `Module`s whose attribute names are the checkpoint's key names
(diffusers layout), so `down_blocks.1.attentions.0.proj_in.weight` in a file is
`unet.down_blocks[1].attentions[0].proj_in.weight` in code. Loading walks that tree once.

Every module computes through `self.ops`, the backend (see `tinysd.backend`): swapping the
backend swaps the primitive ops and nothing else.

Training (`tinysd.train`): a block's `__call__(..., saved=None)` given a dict keeps there what
its `backward(saved, grad)` needs (inference passes None and keeps nothing), and each child
block gets its own sub-dict under its checkpoint name (`child`). A leaf module (Linear, Conv2d,
GroupNorm, LayerNorm, Embedding) has `backward(x, grad)`: its input x is saved by the block that
calls it. Backwards add the parameters' gradients into `module.grads[name]` (allocated on first
use, so micro-batches accumulate) unless the module is `frozen`, and return the input's gradient.
"""
from __future__ import annotations

import numpy as np

from tinysd.backend import NumpyBackend
from tinysd.readers import release_file_pages


class Param:
    """Placeholder for a weight not loaded yet: just its shape."""

    def __init__(self, *shape):
        self.shape = tuple(shape)

    def __repr__(self):
        return f"Param{self.shape}"


def child(saved, name):
    """A fresh dict under `saved[name]` for a child block to keep its activations in (training),
    or None when `saved` is None (inference)."""
    if saved is None:
        return None
    saved[name] = {}
    return saved[name]


class Module:
    ops = NumpyBackend()
    frozen = False          # training: True skips this module's parameter gradients

    def __setattr__(self, name, value):
        if isinstance(value, Param):
            self.__dict__.setdefault("_param_names", []).append(name)
        super().__setattr__(name, value)

    def children(self):
        """(name, module) for direct sub-modules; lists of modules are named by index."""
        for name, value in vars(self).items():
            if isinstance(value, Module):
                yield name, value
            elif isinstance(value, (list, tuple)):
                for i, item in enumerate(value):
                    if isinstance(item, Module):
                        yield f"{name}.{i}", item

    def named_parameters(self, prefix=""):
        """(dotted key, value) for every parameter in the tree, in definition order."""
        for name in self.__dict__.get("_param_names", []):
            yield prefix + name, getattr(self, name)
        for name, child in self.children():
            yield from child.named_parameters(f"{prefix}{name}.")

    def modules(self):
        yield self
        for _, child in self.children():
            yield from child.modules()

    def num_parameters(self):
        return sum(int(np.prod(p.shape)) for _, p in self.named_parameters())

    def freeze(self, frozen=True):
        """Training: stop (or, with False, restart) parameter gradients in this whole subtree.
        Gradients still flow through a frozen module to its input."""
        for module in self.modules():
            module.frozen = frozen
        return self

    def accumulate_grad(self, name, grad):
        """Add ∂L/∂(parameter `name`) into self.grads[name]; the first one is stored as it is."""
        if grad is None:
            return
        grads = self.__dict__.setdefault("grads", {})
        if name in grads:
            grads[name] += grad
        else:
            grads[name] = grad

    def zero_grad(self):
        """Drop every gradient in the subtree (the next backward allocates them afresh)."""
        for module in self.modules():
            module.__dict__.pop("grads", None)

    def named_grads(self, prefix=""):
        """(dotted key, gradient) for every parameter of the subtree that has one."""
        for name, grad in self.__dict__.get("grads", {}).items():
            yield prefix + name, grad
        for name, child_module in self.children():
            yield from child_module.named_grads(f"{prefix}{name}.")

    def set_backend(self, backend):
        """Run this tree on `backend`: every weight passes through `backend.asarray` once."""
        for module in self.modules():
            module.ops = backend
            for name in module.__dict__.get("_param_names", []):
                value = getattr(module, name)
                if not isinstance(value, Param):
                    object.__setattr__(module, name, backend.asarray(value))
        return self

    def load_state_dict(self, state, source="state dict"):
        """Fill every parameter from `state` (key -> array), checking names and shapes.

        Raises KeyError naming missing and unexpected keys, ValueError naming a key whose shape
        differs (both shapes). Nothing is assigned unless every check passes.
        """
        expected = dict(self.named_parameters())
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected]
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"missing {len(missing)} key(s): {', '.join(missing[:8])}"
                             + (" ..." if len(missing) > 8 else ""))
            if unexpected:
                parts.append(f"unexpected {len(unexpected)} key(s): {', '.join(unexpected[:8])}"
                             + (" ..." if len(unexpected) > 8 else ""))
            raise KeyError(f"{type(self).__name__} from {source}: " + "; ".join(parts))
        for key, placeholder in expected.items():
            if tuple(state[key].shape) != tuple(placeholder.shape):
                raise ValueError(f"{type(self).__name__} from {source}: key {key!r} has shape "
                                 f"{tuple(state[key].shape)} in the file, expected {tuple(placeholder.shape)}")
        for key in expected:
            module, name = self._owner(key)
            module.__dict__.setdefault("_hosts", {})[name] = state[key]
            object.__setattr__(module, name, self.ops.asarray(state[key]))
        return self

    # -- weight patches (tinysd.lora): every parameter is re-derived from the array it was loaded from --
    def _owner(self, key):
        """(module, attribute name) of parameter `key`, e.g. "down_blocks.0.resnets.0.conv1.weight"."""
        *path, name = key.split(".")
        module = self
        for part in path:
            module = module[int(part)] if isinstance(module, list) else getattr(module, part)
        return module, name

    def host_array(self, key):
        """The array parameter `key` was loaded from (a view of the memory-mapped file, any float
        dtype), kept by `load_state_dict` so that a patched weight can be undone bit for bit."""
        module, name = self._owner(key)
        return module.__dict__["_hosts"][name]

    def patch_parameter(self, key, delta=None):
        """Set parameter `key` to asarray(host + delta), the sum in float32 (`delta`: a float32
        array of the parameter's shape, used as the sum's buffer), or back to asarray(host) itself,
        the loaded weight, when delta is None. The backend redoes its layout (tap-major convs,
        device copies) for this tensor only. The file pages the sum read are let go: the patched
        copy replaces them (the LCM-LoRA's shapes fused: peak RSS 8.3 → 5.3 GB)."""
        module, name = self._owner(key)
        host = module.__dict__["_hosts"][name]
        if delta is not None:
            if tuple(delta.shape) != tuple(host.shape) or delta.dtype != np.float32:
                raise ValueError(f"patch for {key!r} is {delta.dtype} {tuple(delta.shape)}, "
                                 f"the weight float32 {tuple(host.shape)}")
            patched = np.add(np.asarray(host, dtype=np.float32), delta, out=delta)
            object.__setattr__(module, name, module.ops.asarray(patched))
            release_file_pages(host)
            return
        object.__setattr__(module, name, module.ops.asarray(host))


class Linear(Module):
    def __init__(self, in_features, out_features, bias=True):
        self.weight = Param(out_features, in_features)
        if bias:
            self.bias = Param(out_features)

    def __call__(self, x):
        return self.ops.linear(x, self.weight, getattr(self, "bias", None))

    def backward(self, x, grad):
        dx, dweight, dbias = self.ops.linear_backward(grad, x, self.weight, getattr(self, "bias", None),
                                                      frozen=self.frozen)
        self.accumulate_grad("weight", dweight)
        self.accumulate_grad("bias", dbias)
        return dx


class Conv2d(Module):
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True):
        self.weight = Param(out_channels, in_channels, kernel_size, kernel_size)
        if bias:
            self.bias = Param(out_channels)
        self.stride, self.padding = stride, padding

    def __call__(self, x):
        return self.ops.conv2d(x, self.weight, getattr(self, "bias", None), self.stride, self.padding)

    def backward(self, x, grad):
        dx, dweight, dbias = self.ops.conv2d_backward(grad, x, self.weight, getattr(self, "bias", None),
                                                      self.stride, self.padding, frozen=self.frozen)
        self.accumulate_grad("weight", dweight)
        self.accumulate_grad("bias", dbias)
        return dx


class GroupNorm(Module):
    def __init__(self, num_groups, num_channels, eps):
        self.weight = Param(num_channels)
        self.bias = Param(num_channels)
        self.num_groups, self.eps = num_groups, eps

    def __call__(self, x, silu=False):
        return self.ops.group_norm(x, self.num_groups, self.weight, self.bias, self.eps, silu=silu)

    def backward(self, x, grad, silu=False):
        dx, dweight, dbias = self.ops.group_norm_backward(grad, x, self.num_groups, self.weight, self.bias,
                                                          self.eps, silu=silu, frozen=self.frozen)
        self.accumulate_grad("weight", dweight)
        self.accumulate_grad("bias", dbias)
        return dx


class LayerNorm(Module):
    def __init__(self, dim, eps=1e-5):
        self.weight = Param(dim)
        self.bias = Param(dim)
        self.eps = eps

    def __call__(self, x):
        return self.ops.layer_norm(x, self.weight, self.bias, self.eps)

    def backward(self, x, grad):
        dx, dweight, dbias = self.ops.layer_norm_backward(grad, x, self.weight, self.bias, self.eps,
                                                          frozen=self.frozen)
        self.accumulate_grad("weight", dweight)
        self.accumulate_grad("bias", dbias)
        return dx


class Embedding(Module):
    def __init__(self, num_embeddings, dim):
        self.weight = Param(num_embeddings, dim)

    def __call__(self, ids):
        return self.ops.take(self.weight, ids)

    def backward(self, ids, grad):
        """The table's gradient (rows scatter-added); integer ids get none: returns None."""
        self.accumulate_grad("weight", self.ops.take_backward(grad, self.weight, ids, frozen=self.frozen))
