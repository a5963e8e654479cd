"""Slow, plain references for every method, written from the formulas in the docstrings.

One function per method, in float64 unless it transcribes a library that works in the
gradients' own dtype (timm), each with a one-line docstring naming its formula or source.
Loops and host-side arithmetic are on purpose: these are to be read, not to be fast.
The tests compare gradclip with them; ``benchmarks/bench_methods.py`` times gradclip
against ``timm_adaptive_clip_grad`` and ``per_sample_clipped_mean``.
"""

from __future__ import annotations

import math
import statistics

import numpy as np
import torch

# --- norms and global clipping (gradclip.norms, gradclip.clip) --------------------------------


def global_norm(tensors, norm_type=2.0):
    """Global p-norm (sum_ij |g_ij|^p)^(1/p), max_ij |g_ij| for p = inf, over all tensors as one vector."""
    flat = torch.cat([t.detach().double().reshape(-1) for t in tensors])
    if math.isinf(norm_type):
        return flat.abs().max()
    return flat.abs().pow(norm_type).sum().pow(1.0 / norm_type)


def clip_by_norm(tensors, max_norm, norm_type=2.0):
    """Norm clipping g * min(1, c / (||g||_p + 1e-6)) (Pascanu et al. 2013); returns (norm, clipped tensors)."""
    norm = global_norm(tensors, norm_type)
    factor = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    return norm, [t.detach().double() * factor for t in tensors]


def clip_by_value(tensors, clip_value):
    """Value clipping max(-v, min(v, g_j)), NaN kept (torch.nn.utils.clip_grad_value_)."""
    return [t.detach().double().clamp(-clip_value, clip_value) for t in tensors]


# --- per tensor (gradclip.layerwise) -----------------------------------------------------------


def keras_clipnorm(values, clipnorm):
    """Per-tensor norm clipping g * c / max(||g||_2, c): keras/src/optimizers/base_optimizer.py, per variable, transcribed."""
    values = values.double()
    l2sum = (values * values).sum()
    l2norm = torch.sqrt(l2sum) if l2sum > 0 else l2sum
    return values * clipnorm / torch.maximum(l2norm, torch.tensor(clipnorm, dtype=values.dtype))


def optax_block_rms(u, threshold):
    """Block-RMS clipping g / max(1, rms(g) / c): optax/transforms/_clipping.py clip_by_block_rms, transcribed."""
    u = u.double()
    rms = torch.sqrt(torch.mean(u.abs() ** 2))
    return u / torch.clamp(rms / threshold, min=1.0)


# --- soft clipping (gradclip.soft) -------------------------------------------------------------


def soft_clip_norm(tensors, max_norm, norm_type=2.0):
    """Soft norm clipping g * c / (||g||_p + c) (Zhang, He, Sra and Jadbabaie 2020)."""
    norm = global_norm(tensors, norm_type)
    return [t.detach().double() * max_norm / (norm + max_norm) for t in tensors]


def soft_clip_value(tensor, alpha):
    """Tamed value clipping g_j / (1 + alpha |g_j|), entry by entry (Williamson, Eisenmann and Stillfjord 2024)."""
    values = [g / (1 + alpha * abs(g)) for g in tensor.detach().double().reshape(-1).tolist()]
    return torch.tensor(values, dtype=torch.float64).reshape(tensor.shape)


# --- quantization (gradclip.quantize) ----------------------------------------------------------


def sign(tensor):
    """signSGD's sign(g_j) in {-1, 0, 1}, NaN kept (Bernstein et al. 2018)."""
    values = tensor.detach().double()
    return torch.where(torch.isnan(values), values, torch.sign(values))


def qsgd_paper(v, s, uniforms):
    """Alistarh et al. 2017, eq. (1), entry by entry, in float64, given the uniform draws."""
    norm = math.sqrt(sum(x * x for x in v))
    out = []
    for x, u in zip(v, uniforms):
        if norm == 0:
            out.append(0.0)
            continue
        r = abs(x) / norm * s
        level = math.floor(r)
        xi = (level + 1) / s if u < r - level else level / s
        out.append(norm * math.copysign(1.0, x) * xi if x != 0 else 0.0)
    return out


# --- adaptive gradient clipping (gradclip.agc) ------------------------------------------------


def timm_unitwise_norm(x, norm_type=2.0):
    """timm/utils/agc.py ``unitwise_norm``, transcribed: every axis but 0 reduced."""
    if x.ndim <= 1:
        return x.norm(norm_type)
    return x.norm(norm_type, dim=tuple(range(1, x.ndim)), keepdim=True)


def timm_adaptive_clip_grad(parameters, clip_factor=0.01, eps=1e-3, norm_type=2.0):
    """timm/utils/agc.py ``adaptive_clip_grad``, transcribed (in place, in the gradients' dtype)."""
    for p in parameters:
        if p.grad is None:
            continue
        p_data = p.detach()
        g_data = p.grad.detach()
        max_norm = timm_unitwise_norm(p_data, norm_type=norm_type).clamp_(min=eps).mul_(clip_factor)
        grad_norm = timm_unitwise_norm(g_data, norm_type=norm_type)
        clipped_grad = g_data * (max_norm / grad_norm.clamp(min=1e-6))
        new_grads = torch.where(grad_norm < max_norm, g_data, clipped_grad)
        p.grad.detach().copy_(new_grads)


def agc_unitwise(weight, grad, clip_factor, eps, norm_type=2.0):
    """Brock et al. 2021, eq. 3, one output unit (row of the (out, -1) view) at a time, in float64."""
    w = weight.detach().double().reshape(weight.shape[0], -1) if weight.ndim > 1 else weight.detach().double().reshape(1, -1)
    g = grad.double().reshape(w.shape)
    out = g.clone()
    for i in range(w.shape[0]):
        w_norm = float(torch.linalg.vector_norm(w[i], norm_type))
        g_norm = float(torch.linalg.vector_norm(g[i], norm_type))
        limit = clip_factor * max(w_norm, eps)
        if g_norm >= limit:
            out[i] = g[i] * (limit / max(g_norm, 1e-6))
    return out.reshape(grad.shape)


def agc_unitwise_along(weight, grad, clip_factor, eps, dim, groups=1, norm_type=2.0):
    """Brock et al. 2021, eq. 3, with the output units along axis ``dim`` (within each of ``groups`` blocks of
    axis 0; ``dim=None``: the whole tensor is one unit), one unit at a time, in float64."""
    w, g = weight.detach().double(), grad.double()
    out = g.clone()
    if dim is None or w.ndim <= 1:
        units = [()]  # w[()] is the whole tensor
    else:
        per_block = w.shape[0] // groups
        units = []
        for block in range(groups):
            for j in range(w.shape[dim]):
                index = [slice(None)] * w.ndim
                index[0] = slice(block * per_block, (block + 1) * per_block)
                index[dim] = j
                units.append(tuple(index))
    for index in units:
        w_norm = float(torch.linalg.vector_norm(w[index], norm_type))
        g_norm = float(torch.linalg.vector_norm(g[index], norm_type))
        limit = clip_factor * max(w_norm, eps)
        if g_norm >= limit:
            out[index] = g[index] * (limit / max(g_norm, 1e-6))
    return out


# --- per-sample clipping (gradclip.per_sample) --------------------------------------------------


def per_sample_clipped_mean(model, loss_fn, inputs, targets, max_norm, noise_multiplier=0.0, generator=None,
                            dtype=torch.float64):
    """Abadi et al. 2016, Algorithm 1, one example at a time with autograd: (mean of clipped grads + noise, norms)."""
    params = [p for p in model.parameters() if p.requires_grad]
    summed = [torch.zeros_like(p, dtype=dtype) for p in params]
    norms = []
    for x, y in zip(inputs, targets):
        loss = loss_fn(model(x.unsqueeze(0)), y.unsqueeze(0))
        grads = [g if g.dtype == dtype else g.to(dtype) for g in torch.autograd.grad(loss, params)]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        norms.append(norm)
        factor = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for s, g in zip(summed, grads):
            s.add_(g * factor)
    if noise_multiplier > 0:
        for s in summed:
            s.add_(torch.randn(s.shape, generator=generator, dtype=torch.float32).to(dtype) * noise_multiplier * max_norm)
    return [s / len(inputs) for s in summed], norms


# --- stateful clippers (gradclip.autoclip, gradclip.zclip, gradclip.guard, gradclip.monitor) ---


def autoclip_threshold(history, percentile):
    """AutoClip's threshold numpy.percentile(history, p) over the finite norms only (a non-finite one is
    not recorded), +inf for an empty history (Seetharaman et al. 2020)."""
    values = np.asarray(history, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return math.inf
    return float(np.percentile(values, percentile))


class ReferenceZClip:
    """zclip/zclip.py of bluorion-com/ZClip (Kumar et al. 2025), with Python floats; returns what each step did."""

    def __init__(self, alpha=0.97, z_thresh=2.5, max_grad_norm=1.0, eps=1e-6, warmup_steps=25,
                 mode="zscore", clip_option="adaptive_scaling", clip_factor=1.0, skip_update_on_spike=False):
        self.alpha, self.z_thresh, self.max_grad_norm, self.eps = alpha, z_thresh, max_grad_norm, eps
        self.warmup_steps, self.mode, self.clip_option = warmup_steps, mode, clip_option
        self.clip_factor, self.skip_update_on_spike = clip_factor, skip_update_on_spike
        self.buffer, self.initialized, self.mean, self.var = [], False, None, None

    def _compute_clip_val(self, g):
        std = self.var ** 0.5
        if self.mode == "percentile":
            threshold = self.mean + self.z_thresh * std
            if g > threshold:
                return threshold
        else:
            z = (g - self.mean) / (std + self.eps)
            if z > self.z_thresh:
                if self.clip_option == "adaptive_scaling":
                    eta = z / self.z_thresh
                    return (self.mean + (self.z_thresh * std) / eta) * self.clip_factor
                return self.mean
        return None

    def step(self, g):
        """(coefficient applied, adaptive clip value or None) for norm g."""
        if not self.initialized:
            self.buffer.append(g)
            if len(self.buffer) >= self.warmup_steps:
                self.mean = sum(self.buffer) / len(self.buffer)
                self.var = sum((x - self.mean) ** 2 for x in self.buffer) / len(self.buffer)
                self.initialized, self.buffer = True, []
            if self.max_grad_norm is None:
                return 1.0, None
            return min(1.0, self.max_grad_norm / (g + 1e-6)), None  # torch.nn.utils.clip_grad_norm_
        clip_val = self._compute_clip_val(g)
        adaptive = clip_val if clip_val is not None else g
        effective = min(adaptive, self.max_grad_norm) if self.max_grad_norm is not None else adaptive
        coef = effective / (g + 1e-6) if g > effective else 1.0
        if not (clip_val is not None and self.skip_update_on_spike):
            x = clip_val if clip_val is not None else g
            self.mean = self.alpha * self.mean + (1 - self.alpha) * x
            self.var = self.alpha * self.var + (1 - self.alpha) * (x - self.mean) ** 2
        return coef, clip_val


def spike_guard_decisions(norms, mode, k, window, min_history):
    """SpikeGuard's skip rule: not finite, or g > mean + k std (zscore) / k lower-median (median) of the last
    ``window`` finite norms (a non-finite norm, skipped, is not recorded: it evicts nothing)."""
    history, out = [], []
    for g in norms:
        h = [x for x in history[-window:] if math.isfinite(x)]
        if not math.isfinite(g):
            out.append(True)
        elif len(h) < min_history:
            out.append(False)
        elif mode == "zscore":
            out.append(g > statistics.fmean(h) + k * statistics.stdev(h))
        else:
            out.append(g > k * sorted(h)[(len(h) - 1) // 2])
        if math.isfinite(g):
            history.append(g)
    return out


class ReferenceLossGuard:
    """SpikeGuard with ``signals=("loss", "norm")``, from its docstring: each signal has a history of its values at the
    last ``window`` steps whose norm was finite (a non-finite loss there is a gap, NaN); a step is skipped if either
    value is non-finite or above mean + k (n - 1)-std (zscore) / k lower-median (median) of that signal's finite
    history, once it holds ``min_history`` values; a step with a non-finite norm enters neither history."""

    def __init__(self, mode, k, window, min_history):
        self.mode, self.k, self.window, self.min_history = mode, k, window, min_history
        self.losses, self.norms, self.skipped = [], [], 0  # the values of the counted steps, in order

    def _outlier(self, history, x):
        h = [v for v in history[-self.window:] if math.isfinite(v)]
        if not math.isfinite(x):
            return True
        if len(h) < self.min_history:
            return False
        if self.mode == "zscore":
            return x > statistics.fmean(h) + self.k * statistics.stdev(h)
        return x > self.k * sorted(h)[(len(h) - 1) // 2]

    def step(self, loss, norm):
        """The decision (True: skip) for this step's loss and gradient norm (floats)."""
        skip = self._outlier(self.losses, loss) or self._outlier(self.norms, norm)
        if math.isfinite(norm):
            self.losses.append(loss if math.isfinite(loss) else math.nan)
            self.norms.append(norm)
        self.skipped += skip
        return skip

    def ring(self, values):
        """The history as the guard stores it: slot i holds the latest counted step j with j % window == i."""
        out = [math.nan] * self.window
        for j, v in enumerate(values):
            out[j % self.window] = v
        return torch.tensor(out, dtype=torch.float64)


def olmo_core_skips(losses, norms, interval=128, sigma=6.0):
    """OLMo-core's SkipStepOptimizer.get_step_factor, transcribed in float64 (allenai/OLMo-core main at
    fa6c5014c, src/olmo_core/optim/skip_step_optimizer.py, unchanged there since 1d5c8237a): it keeps the last
    interval + 1 values of each signal (the current one included); once it holds max(2, interval // 2)
    losses, a step is taken only if x - mean <= sigma * std for the loss and for the norm (one-sided), mean
    and (n - 1)-std over the values before x."""
    kept_losses, kept_norms, out = [], [], []
    for loss, norm in zip(losses, norms):
        kept_losses = (kept_losses + [loss])[-(interval + 1):]
        kept_norms = (kept_norms + [norm])[-(interval + 1):]
        if len(kept_losses) < max(2, interval // 2):
            out.append(False)
            continue
        ok = True
        for kept in (kept_losses, kept_norms):
            previous = kept[:-1]
            ok = ok and kept[-1] - statistics.fmean(previous) <= sigma * statistics.stdev(previous)
        out.append(not ok)
    return out


def layer_norms(named, norm_type=2.0):
    """GradientMonitor's per-layer p-norm: the global norm of each layer's tensors, layer = name up to the last dot."""
    layers = {}
    for name, t in named:
        layers.setdefault(name.rsplit(".", 1)[0], []).append(t)
    return {layer: float(global_norm(tensors, norm_type)) for layer, tensors in layers.items()}


# --- Opacus's DP-SGD step (gradclip.per_sample: expected_batch_size, loss_reduction) ------------


def per_example_grads(model, loss_fn, inputs, targets):
    """Each example's gradient of its own loss, one autograd call per example, in float64: {name: (B, *shape)}.

    A trainable parameter the loss does not reach (autograd returns None with
    ``allow_unused=True``) maps to ``None``, as Opacus's ``p.grad_sample`` stays ``None``.
    For an empty batch the structure comes from an example of zeros.
    """
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    probe = (inputs[:1], targets[:1]) if len(inputs) else (
        inputs.new_zeros((1, *inputs.shape[1:])), targets.new_zeros((1, *targets.shape[1:])))
    reached = torch.autograd.grad(loss_fn(model(probe[0]), probe[1]), [p for _, p in named], allow_unused=True)
    out = {}
    for (name, p), g in zip(named, reached):
        out[name] = None if g is None else torch.zeros((len(inputs), *p.shape), dtype=torch.float64)
    for i in range(len(inputs)):
        grads = torch.autograd.grad(loss_fn(model(inputs[i:i + 1]), targets[i:i + 1]), [p for _, p in named],
                                    allow_unused=True)
        for (name, _), g in zip(named, grads):
            if out[name] is not None and g is not None:
                out[name][i] = g.double()
    return out


def opacus_dp_step(per_sample_grads, max_norm, noise, expected_batch_size, reduction):
    """Opacus's DPOptimizer step (clip_and_accumulate, add_noise, scale_grad) in float64; Abadi et al. 2016, arXiv:1607.00133.

    ``per_sample_grads``: one (B, *shape) tensor per parameter that has per-sample
    gradients; ``noise``: the Gaussian noise already drawn, std ``noise_multiplier * max_norm``,
    one tensor per parameter. Transcribed from opacus/optimizers/optimizer.py:
    per-sample norms are the norms of the per-parameter norms, the factor is
    ``(max_norm / (norm + 1e-6)).clamp(max=1)`` (an empty factor for an empty batch),
    ``summed_grad = einsum("i,i...", factor, grad_sample)``, ``grad = summed_grad + noise``,
    divided by ``expected_batch_size`` when ``reduction == "mean"``, left alone for ``"sum"``.
    """
    grads = [g.double() for g in per_sample_grads]
    batch = grads[0].shape[0] if grads else 0
    if batch == 0:
        factor = torch.zeros(0, dtype=torch.float64)
    else:
        per_param = [g.reshape(batch, -1).norm(2, dim=-1) for g in grads]
        norms = torch.stack(per_param, dim=1).norm(2, dim=1)
        factor = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    out = []
    for g, z in zip(grads, noise):
        summed = torch.einsum("i,i...", factor, g)
        step = summed + z.double()
        if reduction == "mean":
            step = step / expected_batch_size
        out.append(step)
    return out


def opacus_per_layer_step(per_sample_grads, max_norms, noise, expected_batch_size, reduction):
    """Opacus's DPPerLayerOptimizer step in float64 (opacus/optimizers/perlayeroptimizer.py, v1.6.0), transcribed.

    ``clip_and_accumulate``: for each parameter and its own threshold C_l, the factor
    ``(C_l / (||g_{i,l}|| + 1e-6)).clamp(max=1)`` from that parameter's per-sample norm alone,
    ``summed_grad = einsum("i,i...", factor, grad_sample)``; then DPOptimizer's ``add_noise`` and
    ``scale_grad`` as in :func:`opacus_dp_step`. The noise (already drawn, one tensor per parameter)
    has std ``noise_multiplier * ||(C_1, ..., C_L)||_2``, the ``max_grad_norm`` Opacus passes on.
    Returns (gradients, per-parameter norms (B, L), factors (B, L)).
    """
    out, norms, factors = [], [], []
    for g, max_norm, z in zip(per_sample_grads, max_norms, noise):
        g = g.double()
        norm = g.reshape(len(g), -1).norm(2, dim=-1)
        factor = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        step = torch.einsum("i,i...", factor, g) + z.double()
        out.append(step / expected_batch_size if reduction == "mean" else step)
        norms.append(norm)
        factors.append(factor)
    return out, torch.stack(norms, dim=1), torch.stack(factors, dim=1)


def fastdp_automatic_step(per_sample_grads, max_norm, noise, batch_size, gamma=0.01, per_layer_norms=None):
    """Automatic clipping (AUTO-S) as fastDP computes it, in float64; Bu, Wang, Zha and Karypis (2023), arXiv:2206.07136.

    Transcribed from awslabs/fast-differential-privacy (3d5cc56), ``fastDP/autograd_grad_sample.py``
    ``_per_block_clip_grad`` with ``clipping_fn='automatic'``: ``norm_sample`` is each example's norm
    over all parameters (``clipping_style='all-layer'``), or each parameter's own norm when
    ``per_layer_norms`` gives a threshold per parameter (``'param-wise'``); the factor is
    ``C = max_grad_norm / (norm_sample + numerical_stability_constant)`` (the constant 1e-2 by default,
    no clamp), the clipped sum ``einsum('b...,b->...', grad_sample, C)``; ``_create_or_extend_private_grad``
    adds ``torch.normal(0, noise_multiplier * max_grad_norm)`` and ``loss_reduction='mean'`` divides by the
    batch size. ``noise``: the Gaussian noise already drawn with that std, one tensor per parameter.
    """
    grads = [g.double() for g in per_sample_grads]
    batch = grads[0].shape[0]
    per_param = torch.stack([g.reshape(batch, -1).norm(2, dim=-1) for g in grads], dim=1)
    if per_layer_norms is None:
        norms = per_param.norm(2, dim=1)
        factors = [max_norm / (norms + gamma)] * len(grads)
    else:
        norms = per_param
        factors = [c / (per_param[:, k] + gamma) for k, c in enumerate(per_layer_norms)]
    out = [(torch.einsum("b...,b->...", g, c) + z.double()) / batch for g, c, z in zip(grads, factors, noise)]
    return out, norms, torch.stack(factors, dim=-1) if per_layer_norms is not None else factors[0]


# --- per-tensor adaptive clipping (gradclip.adagc) ------------------------------------------------


def _tensor_norm(g, norm_type):
    return float(torch.linalg.vector_norm(g, norm_type))


class ReferenceAdaGC:
    """The authors' AdaGC (lishuai-97/AdaGC, megatron-gpt2.patch at commit 32c249fa: class AdaGC, clip_by_norm).

    Transcribed with host floats and float64 tensors: calls count from 1; for the first
    ``start_clip_steps`` calls, global clipping at ``max_norm`` (factor max_norm / (total + eps),
    applied only below 1) and gamma = the smallest clipped norm of each tensor; then, per tensor,
    gamma starts at the tensor's norm if it has none, the tensor is clipped by
    ratio * gamma / (norm + eps) only when norm > ratio * gamma, the clipped norm is taken as
    ratio * gamma, and gamma = beta * gamma + (1 - beta) * clipped norm. ``grads``: one float64
    tensor per position, or None for a parameter without a gradient; returns the clipped copies.
    """

    def __init__(self, clip_ratio, beta, eps, start_clip_steps, max_norm, norm_type=2.0):
        self.clip_ratio, self.beta, self.eps = clip_ratio, beta, eps
        self.start_clip_steps, self.max_norm, self.norm_type = start_clip_steps, max_norm, norm_type
        self.steps = 0
        self.norm_value = {}

    def __call__(self, grads):
        self.steps += 1
        out = [None if g is None else g.detach().double().clone() for g in grads]
        present = [i for i, g in enumerate(out) if g is not None]
        if self.steps <= self.start_clip_steps:
            total = float(global_norm([out[i] for i in present], self.norm_type))
            coeff = self.max_norm / (total + self.eps)
            for i in present:
                if coeff < 1.0:
                    out[i] = out[i] * coeff
                norm = _tensor_norm(out[i], self.norm_type)
                if i not in self.norm_value or norm < self.norm_value[i]:
                    self.norm_value[i] = norm
            return out
        for i in present:
            norm = _tensor_norm(out[i], self.norm_type)
            average = self.norm_value.setdefault(i, norm)
            if norm > self.clip_ratio * average:
                out[i] = out[i] * (self.clip_ratio * average / (norm + self.eps))
                norm = self.clip_ratio * average
            self.norm_value[i] = average * self.beta + norm * (1.0 - self.beta)
        return out


class ReferenceOLMoAdaptiveClipping:
    """OLMo's max_grad_norm_ratio (allenai/OLMo olmo/optim.py, Optimizer._do_adaptive_clipping at 59a53e3f).

    Transcribed in float64: ``global_step`` counts from 1 as OLMo's trainer does; each tensor's
    EMA starts at its norm, and is stored only from global step 2 on (OLMo adds no optimizer
    state on step 1); coef = min(1, ratio * ema / (norm + 1e-6)) multiplies the gradient, and
    the EMA moves toward the clipped norm norm * coef by lerp with weight 1 - beta.
    """

    def __init__(self, max_norm_ratio, beta, norm_type=2.0):
        self.ratio, self.beta, self.norm_type = max_norm_ratio, beta, norm_type
        self.global_step = 0
        self.exp_avg = {}

    def __call__(self, grads):
        self.global_step += 1
        out = [None if g is None else g.detach().double().clone() for g in grads]
        for i, g in enumerate(out):
            if g is None:
                continue
            norm = _tensor_norm(g, self.norm_type)
            ema = self.exp_avg.get(i)
            if ema is None:
                ema = norm
                if self.global_step > 1:
                    self.exp_avg[i] = ema
            coef = min(self.ratio * ema / (norm + 1e-6), 1.0)
            out[i] = g * coef
            ema = ema + (1 - self.beta) * (norm * coef - ema)  # torch.lerp_(end, weight)
            if i in self.exp_avg:
                self.exp_avg[i] = ema
        return out


# --- update clipping (gradclip.update_clip) -------------------------------------------------------


def rms(tensor):
    """Root mean square sqrt(mean(x^2)) of a tensor, in float64."""
    return float(tensor.detach().double().pow(2).mean().sqrt())


class ReferenceStableAdamW:
    """StableAdamW (Wortsman et al. 2023) as the first author's StableAdamWUnfused does it, in float64.

    Transcribed from the gist mitchellnw/d42e22a0b9ec02ceaf4f7b4457f51423 (as copied into public
    repositories): the step t counts from 1; the moments use the debiased coefficients
    beta_hat = beta (1 - beta^(t-1)) / (1 - beta^t), so m and u are already bias-corrected;
    R = sqrt(mean(g^2 / max(u, eps^2))) per tensor; theta <- theta (1 - lr wd) -
    lr / max(1, R / d) * m / (sqrt(u) + eps). ``decay_scaled``: optimi's StableAdamW, whose decay
    uses the scaled rate too, theta (1 - lr / max(1, R / d) * wd).
    """

    def __init__(self, params, lr, betas, eps, weight_decay, d=1.0, decay_scaled=False):
        self.params = [p.detach().double().clone() for p in params]
        self.lr, (self.beta1, self.beta2), self.eps, self.wd, self.d = lr, betas, eps, weight_decay, d
        self.decay_scaled = decay_scaled
        self.m = [torch.zeros_like(p) for p in self.params]
        self.u = [torch.zeros_like(p) for p in self.params]
        self.t = 0

    def step(self, grads):
        """One step with these gradients (float64 copies); returns each tensor's R."""
        self.t += 1
        t, out = self.t, []
        b1 = self.beta1 * (1 - self.beta1 ** (t - 1)) / (1 - self.beta1 ** t)
        b2 = self.beta2 * (1 - self.beta2 ** (t - 1)) / (1 - self.beta2 ** t)
        for k, g in enumerate(grads):
            g = g.double()
            self.m[k] = b1 * self.m[k] + (1 - b1) * g
            self.u[k] = b2 * self.u[k] + (1 - b2) * g * g
            ratio = math.sqrt(float((g * g / torch.clamp(self.u[k], min=self.eps ** 2)).mean()))
            rate = self.lr / max(1.0, ratio / self.d)
            decay = rate if self.decay_scaled else self.lr
            self.params[k] = self.params[k] * (1 - decay * self.wd) - rate * self.m[k] / (self.u[k].sqrt() + self.eps)
            out.append(ratio)
        return out


class ReferenceAdamWUpdateClipped:
    """AdamW (Loshchilov and Hutter 2019) whose update U = m_hat / (sqrt(v_hat) + eps) is clipped by Adafactor's rule.

    In float64: theta <- theta (1 - lr wd) - lr U / max(1, RMS(U) / d) (Shazeer and Stern 2018,
    update clipping, arXiv:1804.04235), the decay left unclipped as in torch.optim.Adafactor.
    """

    def __init__(self, params, lr, betas, eps, weight_decay, d=1.0):
        self.params = [p.detach().double().clone() for p in params]
        self.lr, (self.beta1, self.beta2), self.eps, self.wd, self.d = lr, betas, eps, weight_decay, d
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.t = 0

    def step(self, grads):
        """One step; returns each tensor's RMS(U)."""
        self.t += 1
        out = []
        for k, g in enumerate(grads):
            g = g.double()
            self.m[k] = self.beta1 * self.m[k] + (1 - self.beta1) * g
            self.v[k] = self.beta2 * self.v[k] + (1 - self.beta2) * g * g
            m_hat = self.m[k] / (1 - self.beta1 ** self.t)
            v_hat = self.v[k] / (1 - self.beta2 ** self.t)
            update = m_hat / (v_hat.sqrt() + self.eps)
            size = rms(update)
            self.params[k] = self.params[k] * (1 - self.lr * self.wd) - self.lr * update / max(1.0, size / self.d)
            out.append(size)
        return out


def update_clipped_by_hand(before, after, decay, step_size, d):
    """Adafactor's rule on a step already taken, in float64: the step (1 - c) before - a U, with U clipped.

    ``decay`` is c (the decoupled weight decay), ``step_size`` a; returns (1 - c) before - a U /
    max(1, RMS(U) / d) with a U = (1 - c) before - after.
    """
    decayed = before.double() * (1 - decay)
    update = decayed - after.double()
    size = rms(update) / step_size if step_size else math.nan
    scale = d / size if size > d else 1.0
    return decayed - scale * update
