"""sct_model: MR to synthetic CT (3D latent diffusion, and the bulk-density baseline)."""

__version__ = "0.1.0"
