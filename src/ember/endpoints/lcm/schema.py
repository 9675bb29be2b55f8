"""fal-ai/lcm: "Latent Consistency (SDXL & SDv1.5)", input and output exactly as fal publishes them
(../shared/fal-schemas.md §5; field order as in fal's seed document)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ember.endpoints.common import ImageSizeField, SimpleImage, seed_field


class LcmInput(BaseModel):
    model_config = ConfigDict(extra="ignore", title="LCMInput")

    model: Literal["sdxl", "sdv1-5"] = Field(
        default="sdv1-5", description="The model to use for generating the image."
    )
    prompt: str = Field(
        description="The prompt to use for generating the image. Be as descriptive as possible for best results."
    )
    image_url: str | None = Field(
        default=None,
        description="The base image to use for guiding the image generation on image-to-image "
        "generations. If either width or height of the image is larger than 1024 pixels, the image "
        "will be resized to 1024 pixels while keeping the aspect ratio.",
    )
    mask_url: str | None = Field(
        default=None,
        description="The mask to use for guiding the image generation on image inpainting. The model "
        "will focus on the mask area and try to fill it with the most relevant content. The mask must "
        "be a black and white image where the white area is the area that needs to be filled and the "
        "black area is the area that should be ignored. The mask must have the same dimensions as the image passed as `image_url`.",
    )
    strength: float = Field(
        default=0.8,
        ge=0,
        le=1,
        description="The strength of the image that is passed as `image_url`. The strength determines "
        "how much the generated image will be similar to the image passed as `image_url`. The higher "
        "the strength the more model gets \"creative\" and generates an image that's different from "
        "the initial image. A strength of 1.0 means that the initial image is more or less ignored "
        "and the model will try to generate an image that's as close as possible to the prompt.",
    )
    negative_prompt: str = Field(
        default="",
        description="The negative prompt to use.Use it to address details that you don't want in the "
        "image. This could be colors, objects, scenery and even the small details (e.g. moustache, "
        "blurry, low resolution).",
    )
    seed: int | None = seed_field()  # type: ignore[assignment]
    guidance_scale: float = Field(
        default=1,
        ge=0,
        le=8,
        description="The CFG (Classifier Free Guidance) scale is a measure of how close you want the "
        "model to stick to your prompt when looking for a related image to show you.",
    )
    num_inference_steps: int = Field(
        default=4,
        ge=1,
        le=12,
        description="The number of inference steps to use for generating the image. The more steps the "
        "better the image will be but it will also take longer to generate.",
    )
    image_size: ImageSizeField | None = Field(
        default=None,
        description="The size of the generated image. You can choose between some presets or custom "
        "height and width that **must be multiples of 8**. If not provided: - For text-to-image "
        "generations, the default size is 512x512. - For image-to-image generations, the default size "
        "is the same as the input image. - For inpainting generations, the default size is the same as the input image.",
    )
    sync_mode: bool = Field(
        default=False,
        description="If set to true, the function will wait for the image to be generated and uploaded "
        "before returning the response. This will increase the latency of the function but it allows "
        "you to get the image directly in the response without going through the CDN.",
    )
    num_images: int = Field(
        default=1,
        ge=1,
        le=8,
        description="The number of images to generate. The function will return a list of images with "
        "the same prompt and negative prompt but different seeds.",
    )
    enable_safety_checks: bool = Field(
        default=True,
        description="If set to true, the resulting image will be checked whether it includes any "
        "potentially unsafe content. If it does, it will be replaced with a black image.",
    )
    request_id: str = Field(
        default="",
        description="An id bound to a request, can be used with response to identify the request itself.",
    )
    inpaint_mask_only: bool = Field(
        default=False, description="If set to true, the inpainting pipeline will only inpaint the provided mask area. Only effective for inpainting pipelines."
    )
    controlnet_inpaint: bool = Field(
        default=False,
        description="If set to true, the inpainting pipeline will use controlnet inpainting. Only effective for inpainting pipelines.",
    )
    lora_url: str | None = Field(
        default=None,
        description="The url of the lora server to use for image generation.",
    )
    lora_scale: float = Field(
        default=1, description="The scale of the lora server to use for image generation."
    )


class LcmOutput(BaseModel):
    model_config = ConfigDict(title="LCMOutput")

    images: list[SimpleImage] = Field(description="The generated image files info.")
    timings: dict[str, float]
    seed: int = Field(
        description="Seed of the generated Image. It will be the same value of the one passed in the "
        "input or the randomly generated that was used in case none was passed."
    )
    num_inference_steps: int = Field(
        default=4, description="Number of inference steps used to generate the image. It will be the same value of the one passed in the input or the default one in case none was passed."
    )
    request_id: str = Field(
        default="", description="An id bound to a request, can be used with response to identify the request itself."
    )
    nsfw_content_detected: list[bool] = Field(
        description="A list of booleans indicating whether the generated image contains any potentially "
        "unsafe content. If the safety check is disabled, this field will all will be false."
    )
