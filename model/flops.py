"""Multiply-accumulates (MACs) of one image through a BiT ResNet-v2: the one compute figure.

Counts the convolutions and the head (what `model.resnet.ResNetV2` runs: the 7x7/2 root conv, the
3x3/2 max-pool, bottleneck units with the stride on the 3x3 conv and on the projection); GroupNorm,
ReLU, pooling and the residual adds are not counted (under 1% of the total). 1 MAC = 2 FLOP.
At 224x224 (`python -m model.flops`): R50x1 with the 21,843-class head 4.13 GMACs, the R101x3
without a head (the job uses only its pre-logits) 69.49 GMACs, together 73.62 GMACs = 147.2 GFLOP.
No TensorFlow here: the GPU benchmark (bench/gpu_xla.py) imports it on machines without it.
"""

from model.checkpoint import Architecture


def macs_per_image(architecture: Architecture, image_size: int = 224) -> int:
    """MACs of one `image_size` x `image_size` image through `architecture` (head included when it
    has one: `Architecture(units, width, None)` counts the backbone alone)."""
    units, width, num_classes = architecture
    h = (image_size + 6 - 7) // 2 + 1  # pad 3, 7x7 stride 2
    macs = h * h * 7 * 7 * 3 * 64 * width
    h = (h + 2 - 3) // 2 + 1  # zero pad 1, max-pool 3x3 stride 2
    cin = 64 * width
    for block, count in enumerate(units):
        cmid = 64 * width * 2**block
        cout = 4 * cmid
        for unit in range(count):
            stride = 2 if unit == 0 and block > 0 else 1
            macs += h * h * cin * cmid  # a: 1x1 at the input resolution
            h = (h + 2 - 3) // stride + 1
            macs += h * h * 9 * cmid * cmid  # b: 3x3 with the stride
            macs += h * h * cmid * cout  # c: 1x1
            if unit == 0:
                macs += h * h * cin * cout  # projection shortcut, with the stride
            cin = cout
    return macs + (cin * num_classes if num_classes else 0)


def job_macs_per_image(image_size: int = 224) -> dict:
    """{'tags', 'embed', 'total'}: MACs per image of the job's default models (BiT-M R50x1 with its
    21,843-class head for tags, BiT-M R101x3's pre-logits for embeddings)."""
    tags = macs_per_image(Architecture((3, 4, 6, 3), 1, 21843), image_size)
    embed = macs_per_image(Architecture((3, 4, 23, 3), 3, None), image_size)
    return {"tags": tags, "embed": embed, "total": tags + embed}


if __name__ == "__main__":
    for role, macs in job_macs_per_image().items():
        print(f"{role}: {macs / 1e9:.2f} GMACs = {2 * macs / 1e9:.1f} GFLOP per 224x224 image")
