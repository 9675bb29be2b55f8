"""fal-ai/lora: "Stable Diffusion with LoRAs", input and output exactly as fal publishes them
(../shared/fal-schemas.md §3; field order as in fal's seed document)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ember.endpoints.common import File, Image, ImageSizeField, seed_field

# fal's SchedulerEnum; each name maps to a diffusers class and config in ember.pipeline.schedulers.
SchedulerName = Literal[
    "DPM++ 2M",
    "DPM++ 2M Karras",
    "DPM++ 2M SDE",
    "DPM++ 2M SDE Karras",
    "Euler",
    "Euler A",
    "Euler (trailing timesteps)",
    "LCM",
    "LCM (trailing timesteps)",
    "DDIM",
    "TCD",
]


class LoraWeight(BaseModel):
    model_config = ConfigDict(extra="ignore")

    path: str = Field(description="URL or the path to the LoRA weights.")
    scale: float = Field(
        default=1,
        ge=0,
        le=4,
        description="The scale of the LoRA weight. This is used to scale the LoRA weight before merging "
        "it with the base model.",
    )


class Embedding(BaseModel):
    model_config = ConfigDict(extra="ignore")

    path: str = Field(description="URL or the path to the embedding weights.")
    tokens: list[str] = Field(
        default_factory=lambda: ["<s0>", "<s1>"],
        description="The tokens to map the embedding weights to. Use these tokens in your prompts.",
    )


class ControlNet(BaseModel):
    model_config = ConfigDict(extra="ignore")

    path: str = Field(description="URL or the path to the control net weights.")
    config_url: str | None = Field(
        default=None, description="optional URL to the controlnet config.json file."
    )
    variant: str | None = Field(
        default=None, description="The optional variant if a Hugging Face repo key is used."
    )
    image_url: str = Field(description="URL of the image to be used as the control net.")
    mask_url: str | None = Field(
        default=None,
        description="The mask to use for the controlnet. When using a mask, the control image size and the "
        "mask size must be the same and divisible by 32.",
    )
    conditioning_scale: float = Field(
        default=1,
        ge=0,
        le=2,
        description="The scale of the control net weight. This is used to scale the control net weight "
        "before merging it with the base model.",
    )
    start_percentage: float = Field(
        default=0,
        ge=0,
        le=1,
        description="The percentage of the image to start applying the controlnet in terms of the total "
        "timesteps.",
    )
    end_percentage: float = Field(
        default=1,
        ge=0,
        le=1,
        description="The percentage of the image to end applying the controlnet in terms of the total "
        "timesteps.",
    )
    ip_adapter_index: int | None = Field(
        default=None,
        description="The index of the IP adapter to be applied to the controlnet. This is only needed for "
        "InstantID ControlNets.",
    )


class IPAdapter(BaseModel):
    model_config = ConfigDict(extra="ignore")

    ip_adapter_image_url: str | list[str] = Field(
        description="URL of the image to be used as the IP adapter."
    )
    ip_adapter_mask_url: str | None = Field(
        default=None,
        description="The mask to use for the IP adapter. When using a mask, the ip-adapter image size and "
        "the mask size must be the same",
    )
    path: str = Field(description="URL or the path to the IP adapter weights.")
    model_subfolder: str | None = Field(
        default=None, description="Subfolder in the model directory where the IP adapter weights are stored."
    )
    weight_name: str | None = Field(default=None, description="Name of the weight file.")
    insight_face_model_path: str | None = Field(
        default=None, description="URL or the path to the InsightFace model weights."
    )
    scale: float = Field(
        default=1,
        ge=0,
        description="The scale of the IP adapter weight. This is used to scale the IP adapter weight before "
        "merging it with the base model.",
    )
    scale_json: dict[str, Any] | None = Field(
        default=None,
        description="The scale of the IP adapter weight. This is used to scale the IP adapter weight before "
        "merging it with the base model.",
    )
    unconditional_noising_factor: float = Field(
        default=0,
        ge=0,
        le=1,
        description="The factor to apply to the unconditional noising of the IP adapter.",
    )
    image_projection_shortcut: bool = Field(
        default=True,
        description="The value to set the image projection shortcut to. For FaceID plus V1 models, this "
        "should be set to False. For FaceID plus V2 models, this should be set to True. Default is True.",
    )


class TimestepsInput(BaseModel):
    model_config = ConfigDict(extra="ignore")

    method: Literal["default", "array"] = Field(
        default="default",
        description="The method to use for the timesteps. If set to 'array', the timesteps will be set "
        "based on the provided timesteps schedule in the `array` field. Defaults to 'default' which "
        "means the scheduler will use the `num_inference_steps` parameter.",
    )
    array: list[int] = Field(
        default_factory=list,
        description="Timesteps schedule to be used if 'custom' method is selected.",
    )


class SigmasInput(BaseModel):
    model_config = ConfigDict(extra="ignore")

    method: Literal["default", "array"] = Field(
        default="default",
        description="The method to use for the sigmas. If set to 'custom', the sigmas will be set based on "
        "the provided sigmas schedule in the `array` field. Defaults to 'default' which means the "
        "scheduler will use the sigmas of the scheduler.",
    )
    array: list[float] = Field(
        default_factory=list,
        description="Sigmas schedule to be used if 'custom' method is selected.",
    )


class LoraInput(BaseModel):
    # protected_namespaces=(): `model_name` is fal's field name, not pydantic's `model_` namespace.
    model_config = ConfigDict(extra="ignore", title="TextToImageInput", protected_namespaces=())

    model_name: str = Field(
        description="URL or HuggingFace ID of the base model to generate the image.",
        examples=[
            "stabilityai/stable-diffusion-xl-base-1.0",
            "runwayml/stable-diffusion-v1-5",
            "SG161222/Realistic_Vision_V2.0",
        ],
    )
    unet_name: str | None = Field(
        default=None,
        description="URL or HuggingFace ID of the custom U-Net model to use for the image generation.",
    )
    variant: str | None = Field(
        default=None, description="The variant of the model to use for huggingface models, e.g. 'fp16'."
    )
    prompt: str = Field(
        description="The prompt to use for generating the image. Be as descriptive as possible for best results."
    )
    negative_prompt: str = Field(
        default="",
        description="The negative prompt to use.Use it to address details that you don't want in the "
        "image. This could be colors, objects, scenery and even the small details (e.g. moustache, "
        "blurry, low resolution).",
    )
    prompt_weighting: bool = Field(
        default=False,
        description="If set to true, the prompt weighting syntax will be used. Additionally, this will lift "
        "the 77 token limit by averaging embeddings.",
    )
    loras: list[LoraWeight] = Field(
        default_factory=list,
        description="The LoRAs to use for the image generation. You can use any number of LoRAs and they "
        "will be merged together to generate the final image.",
    )
    embeddings: list[Embedding] = Field(
        default_factory=list,
        description="The embeddings to use for the image generation. Only a single embedding is supported "
        "at the moment. The embeddings will be used to map the tokens in the prompt to the embedding weights.",
    )
    controlnets: list[ControlNet] = Field(
        default_factory=list,
        description="The control nets to use for the image generation. You can use any number of control "
        "nets and they will be applied to the image at the specified timesteps.",
    )
    controlnet_guess_mode: bool = Field(
        default=False,
        description="If set to true, the controlnet will be applied to only the conditional predictions.",
    )
    ip_adapter: list[IPAdapter] = Field(
        default_factory=list, description="The IP adapter to use for the image generation."
    )
    image_encoder_path: str | None = Field(
        default=None, description="The path to the image encoder model to use for the image generation."
    )
    image_encoder_subfolder: str | None = Field(
        default=None,
        description="The subfolder of the image encoder model to use for the image generation.",
    )
    image_encoder_weight_name: str = Field(
        default="pytorch_model.bin",
        description="The weight name of the image encoder model to use for the image generation.",
    )
    ic_light_model_url: str | None = Field(
        default=None, description="The URL of the IC Light model to use for the image generation."
    )
    ic_light_model_background_image_url: str | None = Field(
        default=None,
        description="The URL of the IC Light model background image to use for the image generation. Make "
        "sure to use a background compatible with the model.",
    )
    ic_light_image_url: str | None = Field(
        default=None, description="The URL of the IC Light model image to use for the image generation."
    )
    seed: int | None = seed_field()  # type: ignore[assignment]
    image_size: ImageSizeField = Field(
        default="square_hd",
        description="The size of the generated image. You can choose between some presets or custom height "
        "and width that **must be multiples of 8**.",
    )
    num_inference_steps: int = Field(
        default=30,
        ge=1,
        le=150,
        description="Increasing the amount of steps tells Stable Diffusion that it should take more steps to "
        "generate your final result which can increase the amount of detail in your image.",
    )
    guidance_scale: float = Field(
        default=7.5,
        ge=0,
        le=20,
        description="The CFG (Classifier Free Guidance) scale is a measure of how close you want the model "
        "to stick to your prompt when looking for a related image to show you.",
    )
    clip_skip: int = Field(
        default=0,
        ge=0,
        le=2,
        description="Skips part of the image generation process, leading to slightly different results. "
        "This means the image renders faster, too.",
    )
    scheduler: SchedulerName | None = Field(
        default=None, description="Scheduler / sampler to use for the image denoising process."
    )
    timesteps: TimestepsInput | None = Field(
        default=None,
        description="Optionally override the timesteps to use for the denoising process. Only works with "
        "schedulers which support the `timesteps` argument in their `set_timesteps` method. Defaults to "
        "not overriding, in which case the scheduler automatically sets the timesteps based on the "
        "`num_inference_steps` parameter. If set to a custom timestep schedule, the `num_inference_steps` "
        "parameter will be ignored. Cannot be set if `sigmas` is set.",
    )
    sigmas: SigmasInput | None = Field(
        default=None,
        description="Optionally override the sigmas to use for the denoising process. Only works with "
        "schedulers which support the `sigmas` argument in their `set_sigmas` method. Defaults to not "
        "overriding, in which case the scheduler automatically sets the sigmas based on the "
        "`num_inference_steps` parameter. If set to a custom sigma schedule, the `num_inference_steps` "
        "parameter will be ignored. Cannot be set if `timesteps` is set.",
    )
    prediction_type: Literal["v_prediction", "epsilon"] = Field(
        default="epsilon",
        description="The type of prediction to use for the image generation. The `epsilon` is the default.",
    )
    rescale_betas_snr_zero: bool = Field(
        default=False, description="Whether to set the rescale_betas_snr_zero option or not for the sampler"
    )
    image_format: Literal["jpeg", "png"] = Field(
        default="png", description="The format of the generated image."
    )
    num_images: int = Field(
        default=1,
        ge=1,
        le=8,
        description="Number of images to generate in one request. Note that the higher the batch size, the "
        "longer it will take to generate the images.",
    )
    enable_safety_checker: bool = Field(
        default=False, description="If set to true, the safety checker will be enabled."
    )
    tile_width: int = Field(
        default=4096,
        ge=128,
        le=4096,
        description="The size of the tiles to be used for the image generation.",
    )
    tile_height: int = Field(
        default=4096,
        ge=128,
        le=4096,
        description="The size of the tiles to be used for the image generation.",
    )
    tile_stride_width: int = Field(
        default=2048,
        ge=64,
        le=2048,
        description="The stride of the tiles to be used for the image generation.",
    )
    tile_stride_height: int = Field(
        default=2048,
        ge=64,
        le=2048,
        description="The stride of the tiles to be used for the image generation.",
    )
    eta: float = Field(
        default=0, ge=0, le=1, description="The eta value to be used for the image generation."
    )
    debug_latents: bool = Field(
        default=False, description="If set to true, the latents will be saved for debugging."
    )
    debug_per_pass_latents: bool = Field(
        default=False, description="If set to true, the latents will be saved for debugging per pass."
    )


class LoraOutput(BaseModel):
    model_config = ConfigDict(title="OutputParameters")

    images: list[Image] = Field(description="The generated image files info.")
    seed: int = Field(
        description="Seed of the generated Image. It will be the same value of the one passed in the input "
        "or the randomly generated that was used in case none was passed."
    )
    has_nsfw_concepts: list[bool] = Field(description="Whether the generated images contain NSFW concepts.")
    # Always serialized (null when not requested): older schemas make them optional, newer required.
    debug_latents: File | None = Field(default=None, description="The latents saved for debugging.")
    debug_per_pass_latents: File | None = Field(
        default=None, description="The latents saved for debugging per pass."
    )
