"""Plain nn.Modules: building blocks, autoencoders, quantizers, perception networks. No data,
distribution or logging here."""

from models.base import Autoencoder, AutoencoderOutput, NoPriorError


def build_model(cfg) -> Autoencoder:
    """Build the autoencoder a `ModelConfig` describes (model.kind picks the latent, model.arch the
    encoder/decoder, model.condition the conditioning)."""
    if cfg.kind == "kl":
        from models.autoencoder_kl import AutoencoderKL

        return AutoencoderKL.from_config(cfg)
    if cfg.kind in ("vq", "fsq"):
        from models.vqvae import VQAutoencoder

        return VQAutoencoder.from_config(cfg)
    raise ValueError(f"model.kind: unknown kind {cfg.kind!r}")


__all__ = ["Autoencoder", "AutoencoderOutput", "NoPriorError", "build_model"]
