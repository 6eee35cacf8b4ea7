"""Procedural drawing primitives for the generated demo data sets.

An *object* is a shape (signed distance function), a texture and a colour,
drawn with anti-aliased edges at a position, scale and rotation. Everything
is computed with numpy on a whole image grid at once, so an image costs a few
array operations per object, and the result depends only on the random
generator passed in (bit-identical for the same seed).
"""
import colorsys
from typing import Callable, Dict, Tuple

import numpy as np

__all__ = [
    'SHAPES', 'TEXTURES', 'random_colour', 'render_object', 'background',
    'draw_strokes', 'finish'
]


def _disk(u, v):
    return 1.0 - np.hypot(u, v)


def _square(u, v):
    return 0.8 - np.maximum(np.abs(u), np.abs(v))


def _triangle(u, v):
    # Equilateral triangle: the minimum over three half-planes. Inradius
    # 0.6 (vertices at 1.2) gives it about the area of the other shapes.
    c, s = np.cos(np.pi / 6), np.sin(np.pi / 6)
    return np.minimum.reduce(
        [v + 0.6, -c * u - s * v + 0.6, c * u - s * v + 0.6])


def _ring(u, v):
    r = np.hypot(u, v)
    return np.minimum(r - 0.55, 1.0 - r)


def _cross(u, v):
    au, av = np.abs(u), np.abs(v)
    return np.maximum(np.minimum(0.3 - au, 1.0 - av),
                      np.minimum(0.3 - av, 1.0 - au))


def _star(u, v):
    # Five-pointed star: the radius oscillates with the polar angle.
    r, t = np.hypot(u, v), np.arctan2(v, u)
    return (0.62 + 0.38 * np.cos(5 * t)) - r


def _bar(u, v):
    return np.minimum(1.0 - np.abs(u), 0.35 - np.abs(v))


def _crescent(u, v):
    # A disk minus a shifted disk.
    return np.minimum(1.0 - np.hypot(u, v), np.hypot(u - 0.45, v) - 0.75)


# Shape name -> signed distance in object units (> 0 inside). The order is the
# class order of the demo data sets: class i of the classifier is SHAPES[i].
SHAPES: Dict[str, Callable] = {
    'disk': _disk,
    'square': _square,
    'triangle': _triangle,
    'ring': _ring,
    'cross': _cross,
    'star': _star,
    'bar': _bar,
    'crescent': _crescent,
}


def _solid(x, y, f):
    return np.ones_like(x)


def _stripes(x, y, f):
    return (np.sin(x * f) > 0).astype(np.float32)


def _checker(x, y, f):
    return (np.sin(x * f) * np.sin(y * f) > 0).astype(np.float32)


def _dots(x, y, f):
    return (np.cos(x * f) + np.cos(y * f) < 0.6).astype(np.float32)


def _waves(x, y, f):
    return 0.5 + 0.5 * np.sin(x * f + 2.0 * np.sin(y * f * 0.5))


# Texture name -> pattern in [0, 1] over pixel coordinates x, y (rotated with
# the object) at angular frequency f (radians per pixel).
TEXTURES: Dict[str, Callable] = {
    'solid': _solid,
    'stripes': _stripes,
    'checker': _checker,
    'dots': _dots,
    'waves': _waves,
}


def random_colour(rng: np.random.Generator, hue: float = None,
                  hue_jitter: float = 0.0) -> np.ndarray:
    """An RGB colour in [0, 1]; a given ``hue`` is jittered by ±hue_jitter."""
    h = rng.random() if hue is None else hue + rng.uniform(-1, 1) * hue_jitter
    rgb = colorsys.hsv_to_rgb(h % 1.0, rng.uniform(0.55, 1.0),
                              rng.uniform(0.55, 1.0))
    return np.asarray(rgb, np.float32)


def render_object(img: np.ndarray, shape: str, texture: str,
                  colour: np.ndarray, centre: Tuple[float, float],
                  radius: float, angle: float, tex_freq: float
                  ) -> np.ndarray:
    """Draw one object into ``img`` (H, W, 3 float32, in place).

    Args:
        shape, texture: keys of :data:`SHAPES` and :data:`TEXTURES`.
        colour: RGB in [0, 1]; the texture mixes it with a darker shade.
        centre: (x, y) in pixels; radius: object half-size in pixels.
        angle: rotation in radians; tex_freq: texture frequency (rad/px).

    Returns:
        The coverage (alpha) map in [0, 1], shape (H, W), for label maps.
    """
    h, w = img.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    dx, dy = xx - centre[0], yy - centre[1]
    c, s = np.cos(angle), np.sin(angle)
    x, y = c * dx + s * dy, -s * dx + c * dy  # pixel units, object frame
    sd = SHAPES[shape](x / radius, y / radius) * radius  # ~ pixels
    alpha = np.clip(sd + 0.5, 0.0, 1.0)  # one-pixel anti-aliased edge
    pattern = TEXTURES[texture](x, y, tex_freq)
    shade = 0.35 + 0.65 * pattern
    obj = colour[None, None, :] * shade[..., None]
    img *= 1.0 - alpha[..., None]
    img += alpha[..., None] * obj
    return alpha


def background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A cluttered background: colour gradient plus low-frequency blotches."""
    c0, c1 = random_colour(rng) * 0.8, random_colour(rng) * 0.8
    t = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ramp = (np.cos(t) * xx / w + np.sin(t) * yy / h + 1.0) / 2.0
    img = c0 * (1 - ramp[..., None]) + c1 * ramp[..., None]
    # Blotches: a coarse random grid, bilinearly upsampled.
    gh, gw = 5, 5
    coarse = rng.normal(0, 0.12, (gh, gw, 3)).astype(np.float32)
    ys, xs = np.linspace(0, gh - 1, h), np.linspace(0, gw - 1, w)
    y0 = np.minimum(ys.astype(int), gh - 2)
    x0 = np.minimum(xs.astype(int), gw - 2)
    wy, wx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    top = coarse[y0][:, x0] * (1 - wx) + coarse[y0][:, x0 + 1] * wx
    bot = coarse[y0 + 1][:, x0] * (1 - wx) + coarse[y0 + 1][:, x0 + 1] * wx
    img += top * (1 - wy) + bot * wy
    return img.astype(np.float32)


def draw_strokes(img: np.ndarray, rng: np.random.Generator, n: int,
                 width: float) -> np.ndarray:
    """Draw ``n`` straight random-coloured strokes (clutter) into ``img``.

    Returns their union coverage in [0, 1], shape (H, W).
    """
    h, w = img.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    cover = np.zeros((h, w), np.float32)
    for _ in range(n):
        p = rng.uniform(0, 1, 2) * (w, h)
        q = p + rng.normal(0, 0.4, 2) * (w, h)
        d = q - p
        t = np.clip(((xx - p[0]) * d[0] + (yy - p[1]) * d[1]) /
                    max(float(d @ d), 1e-6), 0, 1)
        dist = np.hypot(xx - p[0] - t * d[0], yy - p[1] - t * d[1])
        alpha = np.clip(width / 2 - dist + 0.5, 0, 1)
        colour = random_colour(rng)
        img *= 1.0 - alpha[..., None]
        img += alpha[..., None] * colour
        cover = np.maximum(cover, alpha)
    return cover


def finish(img: np.ndarray, rng: np.random.Generator,
           noise: float) -> np.ndarray:
    """Random brightness/contrast, Gaussian pixel noise, convert to uint8."""
    gain, bias = rng.uniform(0.75, 1.25), rng.uniform(-0.1, 0.1)
    img = img * gain + bias + rng.normal(0, noise, img.shape)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
