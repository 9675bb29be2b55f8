"""The PixArt-Σ demo's style presets: fal-ai/pixart-sigma's `style` values, as prompt templates.

From PixArt-alpha/PixArt-sigma `app/app_pixart_sigma.py` (`style_list` and `apply_style`): the style's
template wraps the prompt ("{prompt}" replaced), and the style's negative prompt is prepended to the user's
negative prompt with no separator, exactly as the demo concatenates them. "(No style)" leaves both as they
are. fal's enum strings are these names, case and spaces included.
"""

from __future__ import annotations

NO_STYLE = "(No style)"

# name -> (prompt template, negative prompt)
STYLES: dict[str, tuple[str, str]] = {
    NO_STYLE: ("{prompt}", ""),
    "Cinematic": (
        (
            "cinematic still {prompt} . emotional, harmonious, vignette, highly detailed, high budget, bokeh, "
            "cinemascope, moody, epic, gorgeous, film grain, grainy"
        ),
        (
            "anime, cartoon, graphic, text, painting, crayon, graphite, abstract, glitch, deformed, mutated, ugly, "
            "disfigured"
        ),
    ),
    "Photographic": (
        "cinematic photo {prompt} . 35mm photograph, film, bokeh, professional, 4k, highly detailed",
        "drawing, painting, crayon, sketch, graphite, impressionist, noisy, blurry, soft, deformed, ugly",
    ),
    "Anime": (
        "anime artwork {prompt} . anime style, key visual, vibrant, studio anime,  highly detailed",
        "photo, deformed, black and white, realism, disfigured, low contrast",
    ),
    "Manga": (
        "manga style {prompt} . vibrant, high-energy, detailed, iconic, Japanese comic style",
        "ugly, deformed, noisy, blurry, low contrast, realism, photorealistic, Western comic style",
    ),
    "Digital Art": (
        "concept art {prompt} . digital artwork, illustrative, painterly, matte painting, highly detailed",
        "photo, photorealistic, realism, ugly",
    ),
    "Pixel art": (
        "pixel-art {prompt} . low-res, blocky, pixel art style, 8-bit graphics",
        "sloppy, messy, blurry, noisy, highly detailed, ultra textured, photo, realistic",
    ),
    "Fantasy art": (
        (
            "ethereal fantasy concept art of  {prompt} . magnificent, celestial, ethereal, painterly, epic, majestic, "
            "magical, fantasy art, cover art, dreamy"
        ),
        (
            "photographic, realistic, realism, 35mm film, dslr, cropped, frame, text, deformed, glitch, noise, noisy, "
            "off-center, deformed, cross-eyed, closed eyes, bad anatomy, ugly, disfigured, sloppy, duplicate, "
            "mutated, black and white"
        ),
    ),
    "Neonpunk": (
        (
            "neonpunk style {prompt} . cyberpunk, vaporwave, neon, vibes, vibrant, stunningly beautiful, crisp, "
            "detailed, sleek, ultramodern, magenta highlights, dark purple shadows, high contrast, cinematic, ultra "
            "detailed, intricate, professional"
        ),
        "painting, drawing, illustration, glitch, deformed, mutated, cross-eyed, ugly, disfigured",
    ),
    "3D Model": (
        "professional 3d model {prompt} . octane render, highly detailed, volumetric, dramatic lighting",
        "ugly, deformed, noisy, low poly, blurry, painting",
    ),
}


def apply_style(style: str, prompt: str, negative_prompt: str = "") -> tuple[str, str]:
    """(prompt, negative prompt) after the style; ValueError for a name that is not a style."""
    try:
        template, negative = STYLES[style]
    except KeyError as exc:
        raise ValueError(f"style must be one of {list(STYLES)}, not {style!r}") from exc
    return template.replace("{prompt}", prompt), negative + negative_prompt
