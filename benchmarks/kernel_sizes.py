"""The shapes the kernel benchmark times and the static report compiles, one list per op."""

# (label, shape) of the posterior's mean / logvar
POSTERIOR_SIZES = [
    ("sd-f8 256px b32", (32, 4, 32, 32)),
    ("sd-f8 512px b32", (32, 4, 64, 64)),
    ("f8c16 256px b32", (32, 16, 32, 32)),
    ("f8c16 512px b32", (32, 16, 64, 64)),
    ("fills the GPU", (64, 16, 256, 256)),
    ("small", (2, 4, 32, 32)),
]
# (label, shape, groups) of GroupNorm+SiLU's input; the first is also the fills-the-GPU size (268M elements)
GROUP_NORM_SIZES = [
    ("enc level 0, 256px b32", (32, 128, 256, 256), 32),
    ("512 ch 64x64 b32", (32, 512, 64, 64), 32),
    ("small", (2, 128, 32, 32), 32),
]
# (label, shape, act) of RMSNorm+act's input
RMS_NORM_SIZES = [
    ("dc-ae dec head, 256px b32", (32, 128, 256, 256), "relu"),
    ("ResBlock 512 ch 64x64 b32", (32, 512, 64, 64), "none"),
    ("small", (2, 128, 32, 32), "relu"),
]
CPU_POSTERIOR_SIZES = [("sd-f8 256px b2", (2, 4, 32, 32)), ("f8c16 256px b8", (8, 16, 32, 32))]
CPU_GROUP_NORM_SIZES = [("128 ch 32x32 b2", (2, 128, 32, 32), 32), ("64 ch 64x64 b4", (4, 64, 64, 64), 32)]
CPU_RMS_NORM_SIZES = [
    ("128 ch 32x32 b2", (2, 128, 32, 32), "relu"),
    ("64 ch 64x64 b4", (4, 64, 64, 64), "none"),
]
