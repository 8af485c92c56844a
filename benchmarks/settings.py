"""What a benchmark run times: the model configs, the settings (code base and speed options) and their parsing."""

from dataclasses import dataclass

from guided_diffusion.script_util import model_and_diffusion_defaults

PHASES = ("train", "sample")
REFERENCE_SETTING = "reference"
EAGER_SETTING = "eager"
# The loss weightings a setting may name instead of the config's P2 (γ = 1, k = 1); "normalize" adds
# --normalize_weights True. They change one table lookup of the loss, so their step times should equal eager's.
WEIGHTING_OPTIONS = ("min_snr", "soft_min_snr", "sigmoid", "edm", "constant")
SETTING_OPTIONS = ("compile", "channels_last", "nofold", "auto", "bf16", *WEIGHTING_OPTIONS, "normalize")


@dataclass(frozen=True)
class BenchmarkConfig:
    """A model, diffusion and batch sizes to time."""

    flags: dict                  # model and diffusion flags over model_and_diffusion_defaults()
    batch_size: int              # training images per step
    sample_batch_size: int       # images per sampling step
    needs_gpu: bool = False      # too large to time on a CPU in reasonable time
    description: str = ""


_TINY_FLAGS = dict(
    num_res_blocks=1, num_head_channels=32, resblock_updown=True, learn_sigma=True, use_scale_shift_norm=True,
    dropout=0.0, diffusion_steps=1000, noise_schedule="linear", rescale_learned_sigmas=True, p2_gamma=1.0,
    p2_k=1.0,
)
CONFIGS = {
    "tiny16": BenchmarkConfig(
        flags=dict(_TINY_FLAGS, image_size=16, num_channels=32, channel_mult="1,2", attention_resolutions="8"),
        batch_size=4, sample_batch_size=4,
        description="16x16, 32 channels, 1,2, attention at 8 px; for tests",
    ),
    "tiny32": BenchmarkConfig(
        flags=dict(_TINY_FLAGS, image_size=32, num_channels=64, channel_mult="1,2,2,2", attention_resolutions="16,8"),
        batch_size=16, sample_batch_size=16,
        description="32x32, 64 channels, 1,2,2,2, 1 res block, attention at 16 and 8 px (32 ch/head), "
        "BigGAN up/down, learned sigma, P2 gamma 1 k 1, linear T=1000",
    ),
    # The paper's default model (docs/compatibility.md, "Command-line flags": the P2 README's flags; 94M
    # parameters) at its training batch of 8.
    "p2_256": BenchmarkConfig(
        flags=dict(_TINY_FLAGS, image_size=256, num_channels=128, channel_mult="", attention_resolutions="16",
                   num_head_channels=64),
        batch_size=8, sample_batch_size=16, needs_gpu=True,
        description="the paper's 256x256 model (94M), batch 8",
    ),
}
# The paper's optimizer settings (docs/compatibility.md, "Paper settings") and ADM's log interval.
TRAIN_FLAGS = dict(lr=2e-5, ema_rate="0.9999", weight_decay=0.0, log_interval=10)


@dataclass(frozen=True)
class Setting:
    """How one benchmarked run executes: the reference code, or ours with speed options."""

    name: str
    reference: bool = False
    compile: bool = False        # torch.compile of the U-Net (Module.compile, in place)
    channels_last: object = False  # NHWC memory order of the 4-D weights (and the activations); "auto": measured
    fold_upsample: object = True   # nearest x2 upsample folded into the next conv; False: plain; "auto": measured
    precision: str = "fp32"      # fp32, or bf16 autocast
    weighting: str = "p2"        # --weighting of the loss (p2: the config's γ and k)
    normalize_weights: bool = False

    @property
    def matmul_dtype(self):
        return "bf16" if self.precision == "bf16" else "fp32"


def parse_setting(name):
    """'eager' (NCHW, upsamples folded), 'reference', or '+'-joined options such as 'compile+channels_last' or
    'auto' (the choices image_train.py makes by default)."""
    name = name.strip()
    if name == REFERENCE_SETTING:
        return Setting(name, reference=True)
    if name == EAGER_SETTING:
        return Setting(name)
    options = name.split("+")
    unknown = [o for o in options if o not in SETTING_OPTIONS]
    weightings = [o for o in options if o in WEIGHTING_OPTIONS]
    if unknown or len(set(options)) != len(options) or len(weightings) > 1:
        raise ValueError(
            f"setting {name!r} is not understood: use {REFERENCE_SETTING!r}, {EAGER_SETTING!r}, or a '+'-joined "
            f"set of {', '.join(SETTING_OPTIONS)} with at most one weighting (e.g. compile+channels_last, "
            "min_snr+normalize)"
        )
    return Setting(
        name,
        compile="compile" in options,
        channels_last="auto" if "auto" in options else "channels_last" in options,
        fold_upsample="auto" if "auto" in options else "nofold" not in options,
        precision="bf16" if "bf16" in options else "fp32",
        weighting=weightings[0] if weightings else "p2",
        normalize_weights="normalize" in options,
    )


def get_config(name):
    if name not in CONFIGS:
        raise ValueError(f"--config {name!r} is unknown; choose one of {', '.join(CONFIGS)}")
    return CONFIGS[name]


def model_flags(config, setting=None):
    """Every model and diffusion flag of `config` (defaults filled in), with the loss weighting of `setting`."""
    flags = {**model_and_diffusion_defaults(), **config.flags}
    if setting is not None and setting.weighting != "p2":
        flags.update(weighting=setting.weighting, p2_gamma=0.0)
    if setting is not None:
        flags["normalize_weights"] = setting.normalize_weights
    return flags


def train_loop_arguments(config):
    """TrainLoop arguments that ours and the reference's take alike."""
    return dict(
        batch_size=config.batch_size,
        microbatch=-1,
        lr=TRAIN_FLAGS["lr"],
        ema_rate=TRAIN_FLAGS["ema_rate"],
        log_interval=TRAIN_FLAGS["log_interval"],
        save_interval=10**9,
        resume_checkpoint="",
        weight_decay=TRAIN_FLAGS["weight_decay"],
    )
