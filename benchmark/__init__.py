"""purifybench: an adversarial-robustness benchmark for denoising and purification defenses."""

__version__ = "0.1.0"
