"""Use an l2l learned optimizer (format ``l2l-lstm/1``) from Python, with numpy.

One file, two dependencies (``pip install numpy safetensors``). It reads the optimizer
files that l2l writes (``pretrained/*.safetensors``, a run's ``phi.safetensors`` or a
coordinator checkpoint) and computes the learned update exactly as the spec
(``learned-optimizer.md`` §1; ``rnnprop``, l2l's own third preprocessing, as the README
defines it) and the Rust side do, in float32::

    import numpy as np
    from l2l_optimizer import load

    opt = load("pretrained/mlp.safetensors")
    states = {}                                   # one LSTM state per parameter tensor
    for step in range(100):
        grads = compute_gradients(params)         # your own code: name -> np.ndarray
        opt.apply(params, grads, states, lr=1.0)  # params[name] += lr * update, in place

``lr`` multiplies the learned step: 1.0 applies the optimizer as it was meta-trained.
A φ with parameter groups (spec §5) is read with ``load_groups``, which returns one
optimizer per group name; each parameter then goes to its group's optimizer.

The LSTM is the same as ``torch.nn.LSTMCell`` (gates i, f, g, o): ``weight_ih = w_x.T``,
``weight_hh = w_h.T``, ``bias_ih = b``, ``bias_hh = 0`` for each layer; see the README's
"Use a trained optimizer" for the PyTorch recipe.

Run as a script, ``python3 l2l_optimizer.py CHECK_DIR`` compares this module's updates
with a fixture the Rust side wrote (``tests/tests/python_loader.rs``) and exits 1 on a
difference.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass

import numpy as np
from safetensors import safe_open

FORMAT = "l2l-lstm/1"
"""The format tag every l2l optimizer file carries."""

_F32 = np.float32


class FormatError(ValueError):
    """A file that is not an l2l optimizer this loader can use; the message says why."""


@dataclass(frozen=True)
class Config:
    """The optimizer's configuration (spec §1.1), as stored in the file's metadata."""

    preprocess: str
    k: float
    hidden: int
    layers: int
    out_scale: float

    @property
    def inputs(self) -> int:
        """Input features of the first LSTM layer: 1 for identity, 2 for the others."""
        return 1 if self.preprocess == "identity" else 2

    def layout(self) -> list[tuple[str, tuple[int, ...]]]:
        """Tensor names and shapes of spec §4.1, in order."""
        h, h4 = self.hidden, 4 * self.hidden
        out = []
        for l in range(self.layers):
            out.append((f"lstm.{l}.w_x", (self.inputs if l == 0 else h, h4)))
            out.append((f"lstm.{l}.w_h", (h, h4)))
            out.append((f"lstm.{l}.b", (h4,)))
        out += [("out.w", (h, 1)), ("out.b", (1,))]
        return out


# rnnprop's constants (common/src/preprocess.rs): decays of the running mean and second
# moment, and what is added to the second moment's root.
RNNPROP_BETA1 = _F32(0.95)
RNNPROP_BETA2 = _F32(0.95)
RNNPROP_EPS = _F32(1e-8)


class State:
    """One parameter tensor's LSTM state: h and c of every layer, each [n, hidden], and
    with rnnprop the running moments m and v, each [n, 1]."""

    def __init__(self, config: Config, n: int):
        self.h = [np.zeros((n, config.hidden), _F32) for _ in range(config.layers)]
        self.c = [np.zeros((n, config.hidden), _F32) for _ in range(config.layers)]
        self.m = np.zeros((n, 1), _F32)
        self.v = np.zeros((n, 1), _F32)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return _F32(1) / (_F32(1) + np.exp(-z))


class LearnedOptimizer:
    """m_φ: the coordinatewise LSTM that maps each gradient coordinate to its update."""

    def __init__(self, config: Config, tensors: dict[str, np.ndarray]):
        self.config = config
        self.tensors = tensors

    def init_state(self, n: int) -> State:
        """The zero state of a tensor of ``n`` values, as at the start of training."""
        return State(self.config, n)

    def features(self, g: np.ndarray, state: State | None = None) -> np.ndarray:
        """The LSTM's input [n, 1 or 2] for gradients ``g`` [n] (spec §1.2; rnnprop as
        l2l defines it, advancing ``state``'s moments, which it needs)."""
        cfg = self.config
        if cfg.preprocess == "rnnprop" and state is None:
            raise ValueError("rnnprop carries moments: pass the tensor's State (init_state(n))")
        g = g.astype(_F32, copy=False).reshape(-1, 1)
        if cfg.preprocess == "identity":
            return g
        if cfg.preprocess == "rnnprop":
            state.m = RNNPROP_BETA1 * state.m + (_F32(1) - RNNPROP_BETA1) * g
            state.v = RNNPROP_BETA2 * state.v + (_F32(1) - RNNPROP_BETA2) * (g * g)
            d = np.sqrt(state.v) + RNNPROP_EPS
            return np.concatenate([g / d, state.m / d], axis=1).astype(_F32)
        a = np.abs(g)
        large = a >= _F32(math.exp(-cfg.k))
        log = np.log(np.maximum(a, np.finfo(_F32).tiny)) / _F32(cfg.k)
        first = np.where(large, log, _F32(-1))
        second = np.where(large, np.sign(g), g * _F32(math.exp(cfg.k)))
        return np.concatenate([first, second], axis=1).astype(_F32)

    def step(self, grad: np.ndarray, state: State) -> np.ndarray:
        """The update [same shape as ``grad``]; advances ``state`` in place."""
        cfg, t = self.config, self.tensors
        n, hid = grad.size, cfg.hidden
        if state.h[0].shape != (n, hid):
            raise ValueError(f"state is for {state.h[0].shape[0]} values, gradient has {n}")
        x = self.features(grad, state)
        for l in range(cfg.layers):
            z = x @ t[f"lstm.{l}.w_x"] + state.h[l] @ t[f"lstm.{l}.w_h"] + t[f"lstm.{l}.b"]
            i = _sigmoid(z[:, :hid])
            f = _sigmoid(z[:, hid : 2 * hid])
            gg = np.tanh(z[:, 2 * hid : 3 * hid])
            o = _sigmoid(z[:, 3 * hid :])
            state.c[l] = f * state.c[l] + i * gg
            state.h[l] = o * np.tanh(state.c[l])
            x = state.h[l]
        u = (x @ t["out.w"] + t["out.b"]) * _F32(cfg.out_scale)
        return u.reshape(grad.shape).astype(_F32)

    def apply(self, params: dict, grads: dict, states: dict, lr: float = 1.0) -> None:
        """``params[name] += lr * update`` for every name in ``grads``, in place; ``states``
        holds each tensor's LSTM state between calls (start with an empty dict)."""
        for name, g in grads.items():
            if name not in states:
                states[name] = self.init_state(np.size(g))
            params[name] += _F32(lr) * self.step(np.asarray(g), states[name])


def _read(path: str):
    try:
        f = safe_open(path, framework="np")
    except Exception as e:  # the safetensors parser's own message says what is wrong
        raise FormatError(f"{path}: not a safetensors file ({e})") from e
    meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise FormatError(f"{path}: format {meta.get('format')!r}; this loader reads {FORMAT!r}")
    try:
        config = Config(
            preprocess=meta["preprocess"],
            k=float(meta["k"]),
            hidden=int(meta["hidden"]),
            layers=int(meta["layers"]),
            out_scale=float(meta["out_scale"]),
        )
    except (KeyError, ValueError) as e:
        raise FormatError(f"{path}: metadata field {e} is missing or not a number") from e
    if config.preprocess not in ("log_sign", "identity", "rnnprop"):
        raise FormatError(f"{path}: unknown preprocess {config.preprocess!r}")
    return f, meta, config


def _take(f, path: str, prefix: str, config: Config) -> dict[str, np.ndarray]:
    out = {}
    for name, shape in config.layout():
        full = prefix + name
        if full not in f.keys():
            raise FormatError(f"{path}: tensor {full!r} is missing")
        v = f.get_tensor(full)
        if v.dtype != np.float32 or tuple(v.shape) != shape:
            raise FormatError(f"{path}: tensor {full!r} is {v.dtype} {v.shape}, expected float32 {shape}")
        if not np.all(np.isfinite(v)):
            raise FormatError(f"{path}: tensor {full!r} holds a non-finite value")
        out[name] = v
    return out


def load(path: str) -> LearnedOptimizer:
    """Reads a one-group optimizer file (spec §4.1) or a coordinator checkpoint."""
    f, meta, config = _read(path)
    if "groups" in meta:
        raise FormatError(f"{path}: holds parameter groups {meta['groups']} (spec §5); use load_groups")
    return LearnedOptimizer(config, _take(f, path, "", config))


def load_groups(path: str) -> dict[str, LearnedOptimizer]:
    """Reads a grouped optimizer file (spec §5): group name -> its optimizer, in file order."""
    f, meta, config = _read(path)
    if "groups" not in meta:
        raise FormatError(f"{path}: a one-group φ (no 'groups' metadata field); use load")
    return {g: LearnedOptimizer(config, _take(f, path, g + ".", config)) for g in meta["groups"].split(",")}


def _check(directory: str) -> int:
    """Replays a fixture of the Rust side (``case.json``, ``steps.safetensors``: each
    tensor's gradients and the updates Rust computed from them, the LSTM state carried
    from step to step); prints the worst difference and returns the exit code."""
    with open(f"{directory}/case.json") as fh:
        case = json.load(fh)
    phi = f"{directory}/{case['phi']}"
    opts = load_groups(phi) if case["groups"] else {None: load(phi)}
    worst = 0.0
    states = {p: opts[g].init_state(n) for p, (g, n) in case["params"].items()}
    with safe_open(f"{directory}/steps.safetensors", framework="np") as f:
        for t in range(case["steps"]):
            for p, (group, _) in case["params"].items():
                u = _F32(case["lr"]) * opts[group].step(f.get_tensor(f"grad.{t}.{p}"), states[p])
                want = f.get_tensor(f"update.{t}.{p}")
                # Elementwise, with a floor of 1% of the tensor's largest update.
                floor = 0.01 * float(np.max(np.abs(want)))
                err = np.abs(u - want) / np.maximum(np.abs(want), max(floor, 1e-30))
                worst = max(worst, float(np.max(err)))
    print(f"{directory}: {case['steps']} steps of {len(case['params'])} tensors, worst "
          f"|python - rust| / max(|rust|, 1% of its tensor's largest) = {worst:.3e} "
          f"(bound {case['bound']:.0e})")
    return 0 if worst <= case["bound"] else 1


if __name__ == "__main__":
    if len(sys.argv) < 2:
        print(__doc__)
        sys.exit(2)
    sys.exit(max(_check(d) for d in sys.argv[1:]))
