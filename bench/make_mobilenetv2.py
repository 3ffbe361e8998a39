"""Export torchvision's MobileNetV2 (its own initialisation: no weights are downloaded) to ONNX for
`bfpaccel bench --model PATH.onnx`.

    python bench/make_mobilenetv2.py mobilenet_v2.onnx              # as initialised
    python bench/make_mobilenetv2.py mobilenet_v2_cal.onnx --calibrate

As initialised, the network shrinks its activations layer by layer (logits ~1e-9), below fp16's
range: the BFP runtime's fp16 vector precision then rounds the deep layers' values to zero, which
`bfpaccel bench` shows as an "out rel err" of 1.0. ``--calibrate`` first sets every batch norm's
statistics from random inputs (cumulative averages over ``--batches`` batches in training mode),
so every activation stays O(1) as in a trained network -- the same graph and the same work, with
values that exercise every path of the runtime. Needs torch and torchvision (not dependencies of
bfpaccel); uses the TorchScript exporter, opset 17.
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="the ONNX file to write")
    ap.add_argument("--calibrate", action="store_true", help="batch-norm statistics from random inputs")
    ap.add_argument("--batches", type=int, default=8, help="calibration batches of 16 images (default 8)")
    ap.add_argument("--seed", type=int, default=0, help="torch's seed (default 0)")
    args = ap.parse_args(argv)
    try:
        import torch
        import torchvision
    except ImportError as e:
        print(f"make_mobilenetv2: needs torch and torchvision ({e})", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    m = torchvision.models.mobilenet_v2()
    if args.calibrate:
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.reset_running_stats()
                mod.momentum = None  # a cumulative average
        m.train()
        with torch.no_grad():
            for _ in range(args.batches):
                m(torch.randn(16, 3, 224, 224))
    m.eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        print(f"logits of a random image: std {float(m(x).std()):.3g}")
    torch.onnx.export(m, x, args.out, opset_version=17, input_names=["input"], output_names=["output"],
                      dynamo=False)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
