"""A worker that times the official F8Net (snap-research/F8Net, PyTorch) training step.

Started by benchmarks/train_step.py with a Python that has CPU torch (and pyyaml):

    PY benchmarks/official_step.py --official=DIR --model=resnet18 --mode=fixed \
        --batch=8 --image_size=224 --num_classes=1000 [--threads=2 --warmup=2]

DIR is an unmodified tree of the official code; nothing of it is copied or changed here.
The official model, its per-layer setup and its optimizer come from the official functions
(``fix_train.get_model``, ``get_optimizer``, ``forward_loss``) driven by the official
training yml of the model; what a CPU-only, single-process run needs is set around them:

* ``myutils/config.py`` builds its FLAGS at import from ``sys.argv`` (``app:<yml>``,
  ``bs:<batch>``): the argv is set for that one import;
* ``distributed`` is turned off (the non-distributed branch of ``get_model``, no
  all-reduce in ``forward_loss``); ``num_classes`` and ``image_size`` set the shape;
* ``get_model`` calls ``.cuda()``: while it runs, ``Module.cuda`` returns the module;
* torchvision and pytorchcv (data loading, pretrained weights; not on the timed path) are
  replaced by empty modules when they are not installed.

The weights are the official random initialization. A step is zero_grad, forward_loss,
backward and the optimizer step on one fixed batch (uniform [0, 1) pixels, as the official
loader gives). Protocol: after building and ``--warmup`` steps the worker prints one JSON
line ``{"ready": ...}``; then for every line ``N`` on stdin it runs N steps and prints
``{"times": [...], "loss": ...}``; it exits at end of input.
"""

import argparse
import contextlib
import importlib.util
import json
import os
import sys
import time
import types

# (official yml folder, fixed-point yml, floating yml) per model.
YMLS = {
    "resnet18": ("apps/imagenet/resnet18/conventional", "res18_fix_quant_train.yml",
                 "res18_floating_train.yml"),
    "resnet50": ("apps/imagenet/resnet50/tiny_finetuning",
                 "res50_fix_quant_ptcv_pretrained_train.yml", None),
    "mobilenet_v1": ("apps/imagenet/mobilenetv1/conventional", "mbv1_fix_quant_train.yml",
                     "mbv1_floating_train.yml"),
    "mobilenet_v2": ("apps/imagenet/mobilenetv2/conventional", "mbv2_fix_quant_train.yml",
                     "mbv2_floating_train.yml"),
}


def _empty_module(name):
    module = types.ModuleType(name)
    sys.modules[name] = module
    return module


def _replace_absent_imports():
    replaced = []
    if importlib.util.find_spec("torchvision") is None:
        tv = _empty_module("torchvision")
        tv.datasets = _empty_module("torchvision.datasets")
        tv.transforms = _empty_module("torchvision.transforms")
        replaced.append("torchvision")
    if importlib.util.find_spec("pytorchcv") is None:
        provider = _empty_module("pytorchcv.model_provider")
        _empty_module("pytorchcv").model_provider = provider

        def get_model(*args, **kwargs):
            raise RuntimeError("pytorchcv is not installed (pretrained weights)")

        provider.get_model = get_model
        replaced.append("pytorchcv")
    return replaced


def build(args):
    import torch

    folder, fixed_yml, float_yml = YMLS[args.model]
    yml = fixed_yml if args.mode == "fixed" else float_yml
    if yml is None:
        raise SystemExit(f"the official code has no floating training config for {args.model}")
    sys.path.insert(0, args.official)
    replaced = _replace_absent_imports()
    argv = sys.argv
    sys.argv = [argv[0], "app:" + os.path.join(args.official, folder, yml), f"bs:{args.batch}"]
    try:
        from myutils import config
    finally:
        sys.argv = argv
    flags = config.FLAGS
    flags.distributed = False
    flags.num_classes = args.num_classes
    flags.image_size = args.image_size
    with contextlib.redirect_stdout(sys.stderr):
        import fix_train
        for module in (fix_train, config):
            if not os.path.abspath(module.__file__).startswith(os.path.abspath(args.official)):
                raise SystemExit(f"{module.__name__} was not imported from {args.official}")
        fix_train.set_random_seed()
        cuda = torch.nn.Module.cuda
        torch.nn.Module.cuda = lambda self, device=None: self
        try:
            model, wrapper = fix_train.get_model()
        finally:
            torch.nn.Module.cuda = cuda
        optimizer = fix_train.get_optimizer(wrapper)
    criterion = torch.nn.CrossEntropyLoss(reduction="none")

    def step(x, y):
        wrapper.train()
        optimizer.zero_grad()
        loss = fix_train.forward_loss(wrapper, criterion, x, y, None, train=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    info = {"yml": os.path.join(folder, yml), "lr": flags.lr, "weight_decay": flags.weight_decay,
            "params": sum(p.numel() for p in model.parameters()), "replaced_imports": replaced,
            "torch": torch.__version__}
    return step, info


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", required=True)
    parser.add_argument("--model", choices=sorted(YMLS), default="resnet18")
    parser.add_argument("--mode", choices=("fixed", "float"), default="fixed")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--num_classes", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    step, info = build(args)
    generator = torch.Generator().manual_seed(1234)
    x = torch.rand(args.batch, 3, args.image_size, args.image_size, generator=generator)
    y = torch.randint(0, args.num_classes, (args.batch,), generator=generator)
    with contextlib.redirect_stdout(sys.stderr):
        for _ in range(args.warmup):
            step(x, y)
    info.update(ready=True, build_and_warmup_s=round(time.perf_counter() - start, 3),
                threads=torch.get_num_threads())
    print(json.dumps(info), flush=True)
    for line in sys.stdin:
        times, loss = [], None
        with contextlib.redirect_stdout(sys.stderr):
            for _ in range(int(line)):
                t0 = time.perf_counter()
                loss = step(x, y)
                times.append(time.perf_counter() - t0)
        print(json.dumps({"times": times, "loss": loss}), flush=True)


if __name__ == "__main__":
    main()
