"""fal-ai/pixart-sigma: "PixArt-Σ", input and output exactly as fal publishes them
(../shared/fal-schemas.md §4; field order and descriptions as in fal's seed document)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ember.endpoints.common import Image, ImageSizeField, seed_field

# fal's enum strings, exactly (case, spaces and parentheses matter). The templates behind them live with
# the pipeline (ember.pipeline.pixart_styles); a unit test keeps the two lists equal.
Style = Literal[
    "(No style)",
    "Cinematic",
    "Photographic",
    "Anime",
    "Manga",
    "Digital Art",
    "Pixel art",
    "Fantasy art",
    "Neonpunk",
    "3D Model",
]
Scheduler = Literal["DPM-SOLVER", "SA-SOLVER"]


class PixArtSigmaInput(BaseModel):
    model_config = ConfigDict(extra="ignore", title="PixArtSigmaInput")

    prompt: str = Field(
        description="The prompt to use for generating the image. Be as descriptive as possible for best results."
    )
    negative_prompt: str = Field(
        default="",
        description="The negative prompt to use. Use it to address details that you don't want in the image. "
        "This could be colors, objects, scenery and even the small details (e.g. moustache, blurry, low "
        "resolution).",
    )
    style: Style = Field(default="(No style)", description="The style to apply to the image.")
    image_size: ImageSizeField = Field(default="square_hd", description="The size of the generated image.")
    num_inference_steps: int = Field(
        default=35, ge=5, le=50, description="The number of inference steps to perform."
    )
    scheduler: Scheduler = Field(default="DPM-SOLVER", description="The scheduler to use for the model.")
    guidance_scale: float = Field(
        default=4.5,
        ge=1,
        le=10,
        description="The CFG (Classifier Free Guidance) scale is a measure of how close you want the model to "
        "stick to your prompt when looking for a related image to show you.",
    )
    seed: int | None = seed_field()  # type: ignore[assignment]
    sync_mode: bool = Field(
        default=False,
        description="If `True`, the media will be returned as a data URI and the output data won't be "
        "available in the request history.",
    )
    num_images: int = Field(default=1, ge=1, le=8, description="The number of images to generate.")
    enable_safety_checker: bool = Field(
        default=False, description="If set to true, the safety checker will be enabled."
    )


class PixArtSigmaOutput(BaseModel):
    model_config = ConfigDict(title="PixArtSigmaOutput")

    images: list[Image] = Field(description="The generated image files info.")
    timings: dict[str, float] = Field(
        description="The timings of the different steps of the generation process."
    )
    seed: int = Field(
        description="Seed of the generated Image. It will be the same value of the one passed in the input or "
        "the randomly generated that was used in case none was passed."
    )
    has_nsfw_concepts: list[bool] = Field(description="Whether the generated images contain NSFW concepts.")
    prompt: str = Field(description="The prompt used for generating the image.")
