"""fuse() on torchvision's detection and segmentation models: their ResNet-50 backbones run fused, exactly.

Each model is built by its torchvision builder (nothing downloaded) and compared with an unfused copy of itself
in float64 on the reference backend: eval outputs (detections, masks, keypoints, segmentation maps), then one
training step — every loss, the input images' gradients, every parameter's gradient, the parameters after an SGD
step and the buffers (running statistics where they exist). The fused blocks' eager forward is made to fail, so
the fused path is what ran.

The forms covered are the ones people run:

* the pretrained-backbone form of Faster R-CNN, Keypoint R-CNN, RetinaNet and FCOS: torchvision builds it with
  FrozenBatchNorm2d and trains only layer2-4 (``weights_backbone`` given). Here the backbone "weights" are a random
  ResNet-50 state with calibrated statistics, handed to torchvision's own loading code by a patched
  ``ResNet50_Weights.get_state_dict``;
* Mask R-CNN and FCN as built from scratch (BatchNorm2d with batch statistics: the fused training path);
* DeepLabV3 (dilated layer3/4) fine-tuned with its backbone's BatchNorms in eval mode and frozen.

The models are heavy for a 2-core CPU: images are 64x64, the R-CNN mask/keypoint heads are narrowed through the
builders' own keyword arguments (the backbone is what is tested), and each model is built once per module.
"""

import copy
import functools
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import detection as det
from torchvision.models import segmentation as seg
from torchvision.models.detection.keypoint_rcnn import KeypointRCNNHeads
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads
from torchvision.ops.misc import FrozenBatchNorm2d

import resnet_fused
from tolerances import TOL, assert_close
from torchvision_oracle import fused_copy

SIZE = 64
DTYPE = torch.float64
RCNN = dict(min_size=SIZE, max_size=SIZE, rpn_pre_nms_top_n_train=64, rpn_post_nms_top_n_train=16,
            rpn_pre_nms_top_n_test=64, rpn_post_nms_top_n_test=16, box_batch_size_per_image=8,
            box_score_thresh=0.0, box_detections_per_img=4)
ONE_STAGE = dict(min_size=SIZE, max_size=SIZE, score_thresh=0.0, detections_per_img=8, topk_candidates=50)


@dataclass
class Case:
    build: Callable[..., nn.Module]
    kwargs: Callable[[], dict]   # fresh keyword arguments (head modules) per build
    norm: str                    # "frozen" (pretrained-backbone form), "batch" (batch statistics), "eval" (BN frozen)
    batch: int
    segmentation: bool = False


CASES = {
    "fasterrcnn_resnet50_fpn": Case(det.fasterrcnn_resnet50_fpn, lambda: dict(RCNN, num_classes=4), "frozen", 1),
    "keypointrcnn_resnet50_fpn": Case(det.keypointrcnn_resnet50_fpn, lambda: dict(
        RCNN, num_keypoints=3, keypoint_head=KeypointRCNNHeads(256, [16, 512])), "frozen", 1),
    "retinanet_resnet50_fpn": Case(det.retinanet_resnet50_fpn, lambda: dict(ONE_STAGE, num_classes=4), "frozen", 1),
    "fcos_resnet50_fpn": Case(det.fcos_resnet50_fpn, lambda: dict(ONE_STAGE, num_classes=4), "frozen", 1),
    "maskrcnn_resnet50_fpn": Case(det.maskrcnn_resnet50_fpn, lambda: dict(
        RCNN, num_classes=4, mask_head=MaskRCNNHeads(256, [16, 256], 1)), "batch", 2),
    "fcn_resnet50": Case(seg.fcn_resnet50, lambda: dict(num_classes=4), "batch", 2, segmentation=True),
    "deeplabv3_resnet50": Case(seg.deeplabv3_resnet50, lambda: dict(num_classes=4), "eval", 2, segmentation=True),
}


@functools.cache
def _pretrained_like_state() -> dict:
    """A random ResNet-50 state whose BN statistics are those of its own activations (as a trained network's
    are, so that a frozen backbone neither explodes nor vanishes), with random affine parameters. Built once:
    loading copies it into each model."""
    torch.manual_seed(100)
    model = torchvision.models.resnet50()
    gen = torch.Generator().manual_seed(101)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None  # the running statistics become the statistics of the one batch below
                m.weight.copy_(torch.empty(m.weight.shape).uniform_(0.5, 1.5, generator=gen))
                m.bias.copy_(torch.empty(m.bias.shape).uniform_(-0.2, 0.2, generator=gen))
        model.train()(torch.randn(4, 3, SIZE, SIZE, generator=gen))
    return model.state_dict()


def _build(name: str) -> nn.Module:
    case = CASES[name]
    if case.norm != "frozen":
        torch.manual_seed(0)
        return case.build(weights=None, weights_backbone=None, **case.kwargs())
    weights = torchvision.models.ResNet50_Weights.IMAGENET1K_V1
    state = _pretrained_like_state()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(weights), "get_state_dict", lambda self, *args, **kwargs: state)
        torch.manual_seed(0)
        return case.build(weights=None, weights_backbone=weights, **case.kwargs())


def _set_train(model: nn.Module, case: Case) -> None:
    model.train()
    if case.norm == "eval":
        for m in model.backbone.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()


@pytest.fixture(scope="module", params=list(CASES))
def models(request):
    """(name, case, torchvision's model, its fused copy), float64, built once per module."""
    name = request.param
    case = CASES[name]
    ref = _build(name).to(DTYPE)
    if case.norm == "eval":
        for m in ref.backbone.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.requires_grad_(False)
    fused = fused_copy(ref, "reference")
    return name, case, ref, fused


def _images(case: Case) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return [torch.rand(3, SIZE, SIZE, generator=gen, dtype=DTYPE) for _ in range(case.batch)]


def _targets(case: Case) -> list[dict]:
    boxes = torch.tensor([[4.0, 6.0, 40.0, 50.0], [20.0, 10.0, 60.0, 60.0]], dtype=DTYPE)
    masks = torch.zeros(2, SIZE, SIZE, dtype=torch.uint8)
    masks[0, 6:50, 4:40] = 1
    masks[1, 10:60, 20:60] = 1
    keypoints = torch.tensor([[[10.0, 10.0, 1.0], [20.0, 30.0, 1.0], [30.0, 40.0, 1.0]]] * 2)  # float32: required
    labels = torch.tensor([1, 1])  # Keypoint R-CNN has 2 classes
    return [dict(boxes=boxes, labels=labels, masks=masks, keypoints=keypoints) for _ in range(case.batch)]


def _forward(model: nn.Module, case: Case, images: list[torch.Tensor], targets=None):
    if case.segmentation:
        return model(torch.stack(images))
    return model(images, targets) if targets is not None else model(images)


def _loss(model: nn.Module, case: Case, images: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)  # the R-CNN samplers draw random proposals: the same ones in both models
    if not case.segmentation:
        return model(images, _targets(case))
    out = model(torch.stack(images))["out"]
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    return {"weighted_sum": (out * weights).sum() / out.numel()}


def _close(actual: torch.Tensor, expected: torch.Tensor, msg: str) -> None:
    """float64 tolerance relative to the tensor's magnitude (gradients of deep models reach far above 1)."""
    assert_close(actual, expected, DTYPE, max(1.0, expected.abs().max().item()), msg=msg)


def test_backbone_blocks_are_fused(models):
    name, case, ref, fused = models
    rows = resnet_fused.explain(fused, show=False)
    assert len(rows) == 16 and all(r.fused and r.backend == "reference" for r in rows), rows
    blocks = [m for m in fused.modules() if isinstance(m, resnet_fused.Bottleneck)]
    assert len(blocks) == 16
    norm_class = FrozenBatchNorm2d if case.norm == "frozen" else nn.BatchNorm2d
    assert all(type(b.bn2) is norm_class for b in blocks)
    if case.segmentation:  # replace_stride_with_dilation=[False, True, True]
        assert [b.conv2.dilation[0] for b in blocks[7:]] == [1, 2, 2, 2, 2, 2] + [2, 4, 4]  # layer3, layer4
    assert list(fused.state_dict()) == list(ref.state_dict())


def test_eval_outputs_match(models):
    name, case, ref, fused = models
    images = _images(case)
    with torch.no_grad():
        expected = _forward(ref.eval(), case, images)
        actual = _forward(fused.eval(), case, images)
    if case.segmentation:
        expected, actual = [expected], [actual]
    for i, (e, a) in enumerate(zip(expected, actual)):
        assert sorted(a) == sorted(e)
        for key in e:
            if key == "labels":
                assert torch.equal(a[key], e[key]), f"image {i} {key}"
            else:
                assert e[key].numel() > 0, f"image {i}: no {key} to compare"
                _close(a[key], e[key], f"image {i} {key}")


def test_one_training_step_matches(models):
    name, case, ref, fused = models
    results = []
    for model in (ref, fused):
        _set_train(model, case)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=0.01)
        opt.zero_grad(set_to_none=True)
        images = [im.clone().requires_grad_() for im in _images(case)]
        losses = _loss(model, case, images)
        sum(losses.values()).backward()
        opt.step()
        results.append((losses, [im.grad for im in images]))
    (losses_ref, grads_ref), (losses, grads) = results
    assert sorted(losses) == sorted(losses_ref)
    for key in losses_ref:
        _close(losses[key], losses_ref[key], key)
    for i, (g, g_ref) in enumerate(zip(grads, grads_ref)):
        _close(g, g_ref, f"image {i} gradient")
    for (pname, p_ref), p in zip(ref.named_parameters(), fused.parameters()):
        if not p_ref.requires_grad:
            assert p.grad is None and p_ref.grad is None, f"frozen {pname} received a gradient"
        else:
            assert p.grad is not None, pname
            _close(p.grad, p_ref.grad, f"gradient of {pname}")
        _close(p, p_ref, pname)
    for (bname, b_ref), b in zip(ref.named_buffers(), fused.buffers()):
        if bname.endswith("num_batches_tracked"):
            assert torch.equal(b, b_ref), bname
        else:
            _close(b, b_ref, bname)
    backbone_norms = [m for m in fused.backbone.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))]
    if case.norm == "batch":
        assert all(int(m.num_batches_tracked) == 1 for m in backbone_norms)
    else:  # frozen or eval-mode: statistics never updated
        assert all(getattr(m, "num_batches_tracked", torch.tensor(0)) == 0 for m in backbone_norms)
        layer1 = fused.backbone.body.layer1 if hasattr(fused.backbone, "body") else fused.backbone.layer1
        if case.norm == "frozen":  # torchvision trains layer2-4 of a pretrained backbone: layer1 is frozen
            assert all(not p.requires_grad and p.grad is None for p in layer1.parameters())


def _within_twice_torchvision_error(actual, torchvision_result, oracle, dtype, slack, what):
    """The fused result's error against the float64 oracle is at most twice torchvision's own error in the same
    precision, plus the dtype's tolerance (times ``slack``)."""
    actual, torchvision_result, oracle = (t.double() for t in (actual, torchvision_result, oracle))
    rtol, atol = TOL[dtype]
    torchvision_err = (torchvision_result - oracle).abs().max().item()
    allowed = 2 * torchvision_err + slack * (atol + rtol * oracle.abs().max().item())
    err = (actual - oracle).abs().max().item()
    assert err <= allowed, f"{what}: error {err:.3g}, torchvision's {torchvision_err:.3g}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_frozen_detection_backbone_on_the_gpu_backends(backend, dtype):
    """Faster R-CNN's pretrained-form backbone (FrozenBatchNorm2d ResNet-50 + FPN) on a GPU backend, channels_last,
    float32 or bf16 autocast: FPN features in eval and in training mode (the frozen blocks' eval kernels) and the
    input gradient, each within twice torchvision's own error against torchvision in float64."""
    if backend not in resnet_fused.available_backends():
        pytest.skip(f"backend {backend} is not available here")
    ref = _build("fasterrcnn_resnet50_fpn").backbone.to("cuda", memory_format=torch.channels_last)
    oracle = copy.deepcopy(ref).double()
    fused = resnet_fused.fuse(copy.deepcopy(ref), backend=backend)
    assert all(r.fused and r.backend == backend for r in resnet_fused.explain(fused, dtype=dtype, show=False))
    slack = 10.0 if dtype == torch.float32 else 1.0  # float32 convolutions on a GPU round through TF32
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.rand(2, 3, 128, 128, device="cuda", generator=gen).to(memory_format=torch.channels_last)
    for training in (False, True):
        grads, outs = [], []
        for model in (oracle, ref, fused):
            model.train(training)
            xi = x.to(torch.float64 if model is oracle else torch.float32).requires_grad_()
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16 and model is not oracle):
                features = model(xi)
            loss = sum((f.double() * torch.linspace(-1, 1, f.numel(), device="cuda", dtype=torch.float64)
                        .view_as(f)).sum() for f in features.values())
            loss.backward()
            outs.append(features)
            grads.append(xi.grad)
        for key in outs[0]:
            _within_twice_torchvision_error(outs[2][key], outs[1][key], outs[0][key], dtype, slack,
                                            f"features {key} (training={training})")
        _within_twice_torchvision_error(grads[2], grads[1], grads[0], dtype, slack, f"input grad (training={training})")
