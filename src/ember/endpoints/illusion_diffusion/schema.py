"""fal-ai/illusion-diffusion: "Illusion Diffusion", input and output exactly as fal publishes them
(../shared/fal-schemas.md §6; field order and descriptions as in fal's seed document)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ember.endpoints.common import Image, ImageSizeField, seed_field

Scheduler = Literal["DPM++ Karras SDE", "Euler"]


class IllusionDiffusionInput(BaseModel):
    model_config = ConfigDict(extra="ignore", title="IllusionDiffusionInput")

    image_url: str = Field(description="Input image url.")
    prompt: str = Field(
        description="The prompt to use for generating the image. Be as descriptive as possible for best results."
    )
    negative_prompt: str = Field(
        default="",
        description="The negative prompt to use. Use it to address details that you don't want in the image. "
        "This could be colors, objects, scenery and even the small details (e.g. moustache, blurry, low "
        "resolution).",
    )
    # fal gives only a maximum (50); a negative scale has no meaning for CFG, so 0 is the minimum here.
    guidance_scale: float = Field(
        default=7.5,
        ge=0,
        le=50,
        description="The CFG (Classifier Free Guidance) scale is a measure of how close you want the model to "
        "stick to your prompt when looking for a related image to show you.",
    )
    # No range in any fal source: any finite number is accepted (0 switches the ControlNet off).
    controlnet_conditioning_scale: float = Field(
        default=1, allow_inf_nan=False, description="The scale of the ControlNet."
    )
    control_guidance_start: float = Field(default=0, ge=0, le=1)
    control_guidance_end: float = Field(default=1, ge=0, le=1)
    seed: int | None = seed_field()  # type: ignore[assignment]
    scheduler: Scheduler = Field(
        default="Euler", description="Scheduler / sampler to use for the image denoising process."
    )
    num_inference_steps: int = Field(
        default=40,
        ge=0,
        le=80,
        description="Increasing the amount of steps tells Stable Diffusion that it should take more steps to "
        "generate your final result which can increase the amount of detail in your image.",
    )
    image_size: ImageSizeField = Field(
        default="square_hd",
        description="The size of the generated image. You can choose between some presets or custom height and "
        "width that must be multiples of 8.",
    )


class IllusionDiffusionOutput(BaseModel):
    model_config = ConfigDict(title="IllusionDiffusionOutput")

    image: Image = Field(description="The generated image file info.")
    seed: int = Field(
        description="Seed of the generated Image. It will be the same value of the one passed in the input or "
        "the randomly generated that was used in case none was passed."
    )
