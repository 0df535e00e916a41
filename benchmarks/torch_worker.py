"""PyTorch side of the cross-framework comparisons, run in its own process.

Same shapes and architecture as the JAX side; never imports JAX.
``python -m benchmarks.torch_worker '{"tasks": ["bn", "cnn"], "quick": false,
"repeats": 9, "device": "cpu"}'`` prints one JSON line; ``"variants": [...]``
limits the CNN step to those layouts.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time

import torch
from torch import nn

from benchmarks import batches, procs, timing

# Flax's momentum 0.99 (kept for the running mean) is PyTorch's 0.01; the
# CNN's 0.9 (train's default) is 0.1.
BN_MOMENTUM = 0.01
CNN_BN_MOMENTUM = 0.1
LAYOUTS = {"NCHW": torch.contiguous_format, "channels_last": torch.channels_last}


def in_layout(t, layout):
    """A copy of NCHW-shaped ``t`` whose strides are ``layout``'s.

    With one channel either layout's strides pass as contiguous in both, so
    ``.contiguous(memory_format=...)`` keeps whichever ``t`` has, and PyTorch
    picks a layer's layout from the strides: a batch permuted from NHWC data
    then runs the whole net in channels_last, one copied to NCHW in NCHW.
    """
    if layout == torch.channels_last:
        nhwc = t.permute(0, 2, 3, 1).clone(memory_format=torch.contiguous_format)
        return nhwc.permute(0, 3, 1, 2)
    return t.clone(memory_format=torch.contiguous_format)


def _synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _bn_fwd_bwd(layout, quick, device):
    n, h, w, c = batches.bn_shape(quick, "cpu" if device.type == "cpu" else "gpu")
    layer = nn.BatchNorm2d(c, eps=1e-5, momentum=BN_MOMENTUM).to(device).train()
    x = (3.0 + 2.0 * torch.randn(n, c, h, w, device=device)).contiguous(memory_format=layout)
    x.requires_grad_(True)
    g = torch.randn(n, c, h, w, device=device).contiguous(memory_format=layout)
    inputs = (x, layer.weight, layer.bias)

    def call():
        # autograd.grad rather than backward: no accumulation into .grad.
        torch.autograd.grad(layer(x), inputs, g)
        _synchronize(device)
    return call


def bn_task(quick, repeats, device):
    fns = {f"BatchNorm2d {name}": _bn_fwd_bwd(layout, quick, device)
           for name, layout in LAYOUTS.items()}
    times = timing.medians(timing.interleave(fns, repeats))
    return {name: {"seconds": t, "faults_per_call": timing.faults_per_call(fns[name])}
            for name, t in times.items()}


class CNN(nn.Module):
    """train.models.CNN with norm='batch': conv32-pool-conv64-pool-dense128-dense10."""

    def __init__(self):
        super().__init__()
        block = lambda cin, cout: [nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(cout, momentum=CNN_BN_MOMENTUM), nn.ReLU(),
                                   nn.MaxPool2d(2)]
        self.layers = nn.Sequential(
            *block(1, 32), *block(32, 64), nn.Flatten(),
            nn.Linear(7 * 7 * 64, 128, bias=False), nn.BatchNorm1d(128, momentum=CNN_BN_MOMENTUM),
            nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x):
        return self.layers(x)


class Stepper:
    """One Adam step per call, the same work as train's step (loss, grads, update, accuracy)."""

    def __init__(self, layout, n, device):
        torch.manual_seed(0)
        self.device = device
        self.model = CNN().to(device).to(memory_format=layout).train()
        self.opt = torch.optim.Adam(self.model.parameters(), lr=2e-3)
        # The JAX worker's batches, NCHW here, cycled the same way.
        self.batches = [(in_layout(torch.from_numpy(x).to(device).permute(0, 3, 1, 2), layout),
                         torch.from_numpy(y).long().to(device))
                        for x, y in batches.cnn_batches(n)]
        self.calls = 0
        start = time.perf_counter()
        self()
        self.first_step_seconds = time.perf_counter() - start

    def __call__(self):
        x, y = self.batches[self.calls % batches.DISTINCT_BATCHES]
        self.calls += 1
        self.opt.zero_grad(set_to_none=True)
        logits = self.model(x)
        loss = nn.functional.cross_entropy(logits, y)
        loss.backward()
        self.opt.step()
        (logits.argmax(-1) == y).float().mean().item()
        _synchronize(self.device)


def cnn_task(quick, repeats, device, names=None):
    n = 8 if quick else 128
    steppers = {name: Stepper(LAYOUTS[name], n, device) for name in (names or LAYOUTS)}
    times = timing.medians(timing.interleave(steppers, repeats))
    return {name: {"step": times[name], "images_per_second": n / times[name],
                   "first_step": s.first_step_seconds, "faults_per_step": timing.faults_per_call(s)}
            for name, s in steppers.items()}


def _conv_case(layout, shape, cout, wrt_input, n, device):
    h, w, cin = shape
    weight = in_layout(torch.randn(cout, cin, 3, 3, device=device), layout).requires_grad_()
    x = in_layout(torch.randn(n, cin, h, w, device=device), layout)
    x.requires_grad_(wrt_input)
    g = in_layout(torch.randn(n, cout, h, w, device=device), layout)
    inputs = (weight, x) if wrt_input else (weight,)

    def call():
        y = nn.functional.conv2d(x, weight, padding=1)
        torch.autograd.grad(y, inputs, g)
        _synchronize(device)
    return call


def layers_task(quick, repeats, device):
    """The CNN's convolutions alone, in both layouts."""
    n = 8 if quick else 128
    fns = {f"{name} {layout_name}": _conv_case(layout, shape, cout, wrt_input, n, device)
           for name, (shape, cout, wrt_input) in batches.CONV_LAYERS.items()
           for layout_name, layout in LAYOUTS.items()}
    return {name: {"seconds": t} for name, t in timing.medians(timing.interleave(fns, repeats)).items()}


def main(spec):
    procs.die_with_parent()
    procs.pin_cores(spec.get("cores"))
    device = torch.device(spec["device"])
    if device.type == "cpu":
        torch.set_num_threads(len(os.sched_getaffinity(0)))
    tasks = {"bn": bn_task, "cnn": functools.partial(cnn_task, names=spec.get("variants")),
             "layers": layers_task}
    out = {"threads": torch.get_num_threads(), "device": device.type}
    for task in spec["tasks"]:
        out[task] = tasks[task](spec["quick"], spec["repeats"], device)
    return out


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
