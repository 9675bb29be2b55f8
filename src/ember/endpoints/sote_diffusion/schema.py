"""fal-ai/stable-cascade/sote-diffusion: "SoteDiffusion" (anime finetune of Würstchen V3), input and output
exactly as fal publishes them (../shared/fal-schemas.md §2; field order and wording as in fal's seed document).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from ember.endpoints.common import ImageSize, ImageSizeField, SimpleImage, seed_field

_CFG = (
    "The CFG (Classifier Free Guidance) scale is a measure of how close you want the model to stick to "
    "your prompt when looking for a related image to show you."
)


class SoteDiffusionInput(BaseModel):
    model_config = ConfigDict(extra="ignore", title="SoteDiffusionInput")

    prompt: str = Field(
        description="The prompt to use for generating the image. Be as descriptive as possible for best results."
    )
    negative_prompt: str = Field(
        default="",
        description="The negative prompt to use. Use it to address details that you don't want in the "
        "image. This could be colors, objects, scenery and even the small details (e.g. moustache, "
        "blurry, low resolution).",
    )
    first_stage_steps: int = Field(
        default=25, ge=4, le=50, description="Number of steps to run the first stage for."
    )
    second_stage_steps: int = Field(
        default=10, ge=4, le=24, description="Number of steps to run the second stage for."
    )
    guidance_scale: float = Field(default=8, ge=0, le=20, description=_CFG)
    second_stage_guidance_scale: float = Field(default=2, ge=0, le=20, description=_CFG)
    image_size: ImageSizeField = Field(
        default=ImageSize(width=1024, height=1536),
        description="The size of the generated image.",
    )
    seed: int | None = seed_field()  # type: ignore[assignment]
    enable_safety_checker: bool = Field(
        default=True, description="If set to false, the safety checker will be disabled."
    )
    num_images: int = Field(default=1, ge=1, le=4, description="The number of images to generate.")
    sync_mode: bool = Field(
        default=False,
        description="If set to true, the image will be returned as base64 encoded string.",
    )


class SoteDiffusionOutput(BaseModel):
    model_config = ConfigDict(title="SoteDiffusionOutput")

    images: list[SimpleImage] = Field(description="The generated image files info.")
    timings: dict[str, float]
    seed: int = Field(
        description="Seed of the generated Image. It will be the same value of the one passed in the "
        "input or the randomly generated that was used in case none was passed."
    )
    has_nsfw_concepts: list[bool] = Field(description="Whether the generated images contain NSFW concepts.")
    prompt: str = Field(description="The prompt used for generating the image.")
