"""ember: fal.ai-compatible diffusion serving on Triton."""
