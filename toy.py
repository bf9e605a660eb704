"""The built-in synthetic GTA-V/Cityscapes pair: street scenes drawn twice from one kind of layout.

    python datasets.py make-toy data/toy        # the entry point; --toy makes it on first use

The source looks like a game (flat colours, sharp edges, GTA-V's 1914:1052 aspect), the target like a
camera (other colours, textures, blur, sensor noise, lighting, an ego-vehicle hood, 2:1 aspect, more
people and bicycles, fewer buses and trains). Both are written in the real datasets' layouts and
encodings, so the real loaders read them. Same seed, same bytes: every random draw happens in a fixed
order, which is why the scene below draws in exactly the order it places things.
"""
import functools
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from cityscapesscripts.helpers.labels import labels as CS_LABELS

from files import write_mat_vectors
from utils import SPLITS, UserError, seeded_split

TOY_CITIES = {"train": ("aachen", "bochum", "bremen"), "val": ("frankfurt", "lindau"), "test": ("berlin",)}
TOY_SOURCE_SIZE = (640, 352)
TOY_TARGET_SIZE = (512, 256)

# Cityscapes label ids
ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, LIGHT, SIGN, VEG, TERRAIN, SKY = 7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23
PERSON, RIDER, CAR, TRUCK, BUS, TRAIN, MOTO, BIKE = 24, 25, 26, 27, 28, 31, 32, 33
EGO, STATIC, GROUND, PARKING, RAIL, GUARD = 1, 4, 6, 9, 10, 14

SOURCE_STYLE = {
    "colours": {ROAD: (88, 86, 96), SIDEWALK: (176, 160, 146), BUILDING: (160, 112, 86), WALL: (196, 180, 136),
                FENCE: (128, 96, 64), POLE: (58, 58, 64), LIGHT: (36, 36, 30), SIGN: (236, 196, 40),
                VEG: (52, 150, 46), TERRAIN: (150, 176, 72), SKY: (96, 164, 236), PERSON: (204, 64, 60),
                RIDER: (64, 70, 200), CAR: (200, 40, 40), TRUCK: (214, 214, 206), BUS: (236, 176, 28),
                TRAIN: (190, 48, 56), MOTO: (40, 40, 48), BIKE: (24, 90, 170), STATIC: (126, 92, 58),
                GROUND: (134, 120, 96), PARKING: (110, 96, 110), RAIL: (112, 90, 76), GUARD: (186, 186, 190)},
    "jitter": 12, "cars": (1, 4), "persons": (1, 4), "poles": (2, 5), "trees": (1, 3),
    "p": {"truck": 0.5, "bus": 0.45, "train": 0.3, "bike": 0.45, "moto": 0.45, "fence": 0.5, "wall": 0.5},
}
TARGET_STYLE = {
    "colours": {ROAD: (70, 72, 74), SIDEWALK: (128, 124, 120), BUILDING: (118, 116, 112), WALL: (150, 146, 132),
                FENCE: (96, 100, 92), POLE: (96, 98, 102), LIGHT: (24, 26, 30), SIGN: (186, 172, 90),
                VEG: (78, 100, 52), TERRAIN: (112, 124, 80), SKY: (196, 206, 218), PERSON: (72, 60, 66),
                RIDER: (60, 66, 80), CAR: (110, 112, 120), TRUCK: (160, 158, 150), BUS: (170, 140, 70),
                TRAIN: (150, 150, 160), MOTO: (30, 30, 34), BIKE: (44, 44, 50), STATIC: (90, 80, 70),
                GROUND: (100, 96, 90), PARKING: (84, 80, 88), RAIL: (92, 84, 78), GUARD: (150, 152, 156)},
    "jitter": 28, "cars": (2, 6), "persons": (2, 6), "poles": (3, 6), "trees": (2, 5),
    "p": {"truck": 0.3, "bus": 0.2, "train": 0.15, "bike": 0.65, "moto": 0.25, "fence": 0.4, "wall": 0.3},
}


class Scene:
    """One street in perspective, painted into an RGB image and a label-id image with the same shapes.

    The layout (horizon, vanishing point, road and sidewalk edges) is drawn first; every object then
    stands on a ground row y, and depth(y) scales it.
    """

    def __init__(self, rng, size, style):
        self.canvas(rng, size, style)
        w, h = size
        self.hz = h * rng.uniform(0.36, 0.5)  # horizon
        self.vx = w * rng.uniform(0.35, 0.65)  # vanishing point
        # road centre and half width at the bottom
        self.cx, self.rb = w * rng.uniform(0.4, 0.6), w * rng.uniform(0.28, 0.42)
        self.sw = w * rng.uniform(0.1, 0.22)  # sidewalk width at the bottom

    def canvas(self, rng, size, style):
        """The empty picture and label image, and what paints them (no random draw: the layout's come after)."""
        self.rng, self.style = rng, style
        self.w, self.h = size
        self.rgb, self.lab = Image.new("RGB", size), Image.new("L", size)
        self._draw_rgb, self._draw_lab = ImageDraw.Draw(self.rgb), ImageDraw.Draw(self.lab)

    # ------------------------------------------------------------------ geometry and paint

    def lerp(self, a, b, y):
        return a + (b - a) * (y - self.hz) / (self.h - self.hz)

    def road_l(self, y):
        return self.lerp(self.vx - self.w * 0.015, self.cx - self.rb, y)

    def road_r(self, y):
        return self.lerp(self.vx + self.w * 0.015, self.cx + self.rb, y)

    def out_l(self, y):
        return self.lerp(self.vx - self.w * 0.03, self.cx - self.rb - self.sw, y)

    def out_r(self, y):
        return self.lerp(self.vx + self.w * 0.03, self.cx + self.rb + self.sw, y)

    def depth(self, y):
        """Apparent size of an object standing at row y."""
        return max(0.03, (y - self.hz) / (self.h - self.hz))

    def ground_row(self, lo=0.08, hi=1.0):
        return self.hz + (self.h - self.hz) * self.rng.uniform(lo, hi)

    def on_road(self, y):
        left, right = self.road_l(y), self.road_r(y)
        return self.rng.uniform(left * 0.8 + right * 0.2, left * 0.2 + right * 0.8)

    def colour(self, cid, base=None):
        jitter = self.style["jitter"]
        c = np.array(base or self.style["colours"][cid]) + self.rng.integers(-jitter, jitter + 1)
        return tuple(int(v) for v in np.clip(c, 0, 255))

    def paint(self, kind, xy, cid, col=None, **kw):
        """The same shape in both images: a colour in the picture, the class id in the label."""
        getattr(self._draw_rgb, kind)(xy, fill=col or self.colour(cid), **kw)
        getattr(self._draw_lab, kind)(xy, fill=cid, **kw)

    def random_colour(self, cid, lo, hi):
        return self.colour(cid, tuple(int(v) for v in self.rng.integers(lo, hi, 3)))

    # ------------------------------------------------------------------ the background

    def sky_and_buildings(self):
        """Buildings from each image border towards the vanishing point, shrinking; now and then a tree."""
        w, h, hz, vx, rng = self.w, self.h, self.hz, self.vx, self.rng
        self.paint("rectangle", (0, 0, w, h), SKY)
        for step in (1, -1):
            x = 0.0 if step > 0 else float(w)
            while (vx - x) * step > w * 0.04:
                bw = w * rng.uniform(0.06, 0.18)
                x2 = x + step * bw
                near = abs(x - vx) / max(vx, w - vx)
                top = hz - h * (0.08 + rng.uniform(0.1, 0.45) * near)
                if rng.random() < 0.15:
                    self.paint("ellipse", (min(x, x2), top, max(x, x2), hz + h * 0.08), VEG)
                else:
                    self.building(min(x, x2), max(x, x2), top, bw, near)
                x = x2

    def building(self, left, right, top, bw, near):
        h, hz = self.h, self.hz
        self.paint("rectangle", (left, top, right, hz + h * 0.05), BUILDING)
        window = self.colour(BUILDING, tuple(int(v * 0.6) for v in self.style["colours"][BUILDING]))
        for wy in np.arange(top + h * 0.03, hz - h * 0.02, h * 0.06 * (0.4 + near)):
            for wx in np.arange(left + bw * 0.1, right - bw * 0.15, bw * 0.25):
                self.paint("rectangle", (wx, wy, wx + bw * 0.12, wy + h * 0.025 * (0.4 + near)), BUILDING, window)

    def ground_and_road(self):
        """Terrain, two sidewalks, the road with its lane marks, and maybe a parking bay and a guard rail."""
        w, h, hz, rng = self.w, self.h, self.hz, self.rng
        road_l, road_r, out_l, out_r = self.road_l, self.road_r, self.out_l, self.out_r
        self.paint("rectangle", (0, hz, w, h), TERRAIN if rng.random() < 0.75 else GROUND)
        self.paint("polygon", [(out_l(hz), hz), (road_l(hz), hz), (road_l(h), h), (out_l(h), h)], SIDEWALK)
        self.paint("polygon", [(road_r(hz), hz), (out_r(hz), hz), (out_r(h), h), (road_r(h), h)], SIDEWALK)
        self.paint("polygon", [(road_l(hz), hz), (road_r(hz), hz), (road_r(h), h), (road_l(h), h)], ROAD)
        for y in np.arange(hz + (h - hz) * 0.1, h, (h - hz) * 0.18):
            self.lane_mark(y, y + (h - hz) * 0.07)
        if rng.random() < 0.3:  # void classes the model must learn to ignore
            y = hz + (h - hz) * rng.uniform(0.4, 0.8)
            y2 = y + h * 0.08
            self.paint("polygon", [(road_l(y), y), (road_l(y) + w * 0.08 * self.depth(y), y),
                                   (road_l(y2) + w * 0.1, y2), (road_l(y2), y2)], PARKING)
        if rng.random() < 0.3:
            self.paint("line", [(road_r(hz + 2), hz + 2 - h * 0.01), (road_r(h), h - h * 0.06)], GUARD,
                       width=max(2, h // 60))

    def lane_mark(self, y, y2):
        """A white dash in the middle of the road: still labelled road."""
        mid = lambda yy: (self.road_l(yy) + self.road_r(yy)) / 2
        w, depth = self.w, self.depth
        self.paint("polygon", [(mid(y) - w * 0.004 * depth(y), y), (mid(y) + w * 0.004 * depth(y), y),
                               (mid(y2) + w * 0.006 * depth(y2), y2), (mid(y2) - w * 0.006 * depth(y2), y2)],
                   ROAD, (225, 225, 215))

    # ------------------------------------------------------------------ objects, one kind each

    def fence(self, y0, y1, edge):
        h, w, depth = self.h, self.w, self.depth
        tops = []
        for y in np.linspace(y0, y1, 6):
            top = y - h * 0.12 * depth(y)
            self.paint("line", [(edge(y), y), (edge(y), top)], FENCE, width=max(1, int(w * 0.006 * depth(y))))
            tops.append((edge(y), y, top))
        for a, b in zip(tops, tops[1:]):
            for frac in (0.0, 0.5):
                self.paint("line", [(a[0], a[2] + (a[1] - a[2]) * frac), (b[0], b[2] + (b[1] - b[2]) * frac)], FENCE,
                           width=max(1, int(w * 0.004 * depth(b[1]))))

    def wall(self, y0, y1, edge, side):
        dx, h, depth = side * self.w * 0.01, self.h, self.depth
        self.paint("polygon", [(edge(y0) + dx, y0), (edge(y1) + dx, y1), (edge(y1) + dx, y1 - h * 0.2 * depth(y1)),
                               (edge(y0) + dx, y0 - h * 0.2 * depth(y0))], WALL)

    def pole(self, y, x):
        """A pole carrying a traffic light (lamps lit at random), a sign, or nothing."""
        w, h, rng = self.w, self.h, self.rng
        d = self.depth(y)
        top = y - h * 0.6 * d
        self.paint("rectangle", (x - w * 0.004 * d - 0.5, top, x + w * 0.004 * d + 0.5, y), POLE)
        kind = rng.random()
        if kind < 0.45:
            bw, bh = w * 0.016 * d + 1, h * 0.09 * d + 2
            self.paint("rectangle", (x - bw, top - bh, x + bw, top), LIGHT)
            for i, lamp in enumerate(((220, 40, 30), (230, 170, 20), (40, 200, 80))):
                r = bw * 0.6
                ly = top - bh + bh * (i + 0.5) / 3
                if rng.random() < 0.5:
                    self.paint("ellipse", (x - r, ly - r, x + r, ly + r), LIGHT, lamp)
        elif kind < 0.9:
            r = w * 0.02 * d + 1.5
            shape = rng.integers(3)
            if shape == 0:
                self.paint("ellipse", (x - r, top - 2 * r, x + r, top), SIGN)
            elif shape == 1:
                self.paint("polygon", [(x - r, top), (x + r, top), (x, top - 2 * r)], SIGN)
            else:
                self.paint("rectangle", (x - r, top - 1.5 * r, x + r, top), SIGN)

    def tree(self, y, x):
        w, h, rng = self.w, self.h, self.rng
        d = self.depth(y)
        self.paint("rectangle", (x - w * 0.006 * d, y - h * 0.3 * d, x + w * 0.006 * d, y), VEG)
        for _ in range(3):
            rx, ry = w * rng.uniform(0.04, 0.08) * d, h * rng.uniform(0.1, 0.18) * d
            ox, oy = rng.uniform(-rx, rx) * 0.6, h * 0.3 * d + rng.uniform(0, ry)
            self.paint("ellipse", (x + ox - rx, y - oy - ry, x + ox + rx, y - oy + ry), VEG)

    def person(self, y, x, cid=PERSON, lift=0.0):
        """A pedestrian, or with cid=RIDER and a lift a rider sitting on a two-wheeler (no legs)."""
        ph = self.h * 0.32 * self.depth(y)
        base = y - lift * ph
        head = ph * 0.13
        body = self.random_colour(cid, 30, 230) if self.style is SOURCE_STYLE else None  # the game's bright clothes
        self.paint("rectangle", (x - ph * 0.12, base - ph * 0.82, x + ph * 0.12, base - ph * 0.42), cid, body)
        if lift == 0:
            for sign in (-1, 1):
                self.paint("line", [(x + sign * ph * 0.06, base - ph * 0.43), (x + sign * ph * 0.1, base)], cid,
                           width=max(1, int(ph * 0.07)))
        self.paint("ellipse", (x - head, base - ph * 0.82 - 2 * head, x + head, base - ph * 0.82), cid,
                   self.colour(cid, (214, 170, 140)))

    def two_wheeler(self, y, x, cid, ridden):
        """A bicycle (ring wheels) or a motorcycle (solid wheels, a tank), maybe with its rider."""
        r = self.h * 0.06 * self.depth(y) + 1
        lw = max(1, int(r * 0.3))
        for wx in (x - 1.8 * r, x + 1.8 * r):
            self.paint("ellipse", (wx - r, y - 2 * r, wx + r, y), cid, **({"width": lw} if cid == BIKE else {}))
        self.paint("line", [(x - 1.8 * r, y - r), (x, y - 2.2 * r), (x + 1.8 * r, y - r), (x - 1.8 * r, y - r)], cid,
                   width=lw)
        if cid == MOTO:
            self.paint("rectangle", (x - 1.2 * r, y - 2.6 * r, x + 1.2 * r, y - 1.2 * r), cid)
        if ridden:
            self.person(y - 1.8 * r, x, RIDER, lift=0.0001)

    def vehicle(self, y, x, cid):
        """A car (body, cabin, wheels) or a box with windows: truck, bus, or a train on its rails."""
        w, h = self.w, self.h
        d = self.depth(y)
        length, height = {CAR: (0.22, 0.11), TRUCK: (0.3, 0.24), BUS: (0.42, 0.26), TRAIN: (1.2, 0.28)}[cid]
        vw, vh = w * length * d, h * height * d
        col = self.random_colour(cid, 20, 235) if cid == CAR and self.style is SOURCE_STYLE else self.colour(cid)
        if cid == CAR:
            self.paint("rectangle", (x - vw / 2, y - vh * 0.6, x + vw / 2, y - vh * 0.1), cid, col)
            self.paint("polygon", [(x - vw * 0.3, y - vh * 0.6), (x + vw * 0.3, y - vh * 0.6), (x + vw * 0.2, y - vh),
                                   (x - vw * 0.2, y - vh)], cid, col)
            for wx in (x - vw * 0.3, x + vw * 0.3):
                self.paint("ellipse", (wx - vh * 0.18, y - vh * 0.36, wx + vh * 0.18, y), cid, (20, 20, 20))
            return
        if cid == TRAIN:
            self.paint("rectangle", (0, y - h * 0.01 * d, w, y + h * 0.02 * d), RAIL)
        self.paint("rectangle", (x - vw / 2, y - vh, x + vw / 2, y), cid, col)
        dark = tuple(int(v * 0.45) for v in col)
        for wx in np.arange(x - vw * 0.45, x + vw * 0.4, vw * (0.12 if cid != TRUCK else 0.9)):
            self.paint("rectangle", (wx, y - vh * 0.85, wx + vw * 0.08, y - vh * 0.55), cid, dark)

    def train(self, y):
        self.vehicle(y, self.rng.uniform(0, self.w), TRAIN)  # where along the rails: drawn when it is painted

    def static(self, y, x, d):
        """A bin or a crate on the pavement: 'static', ignored in training."""
        self.paint("rectangle", (x, y - self.h * 0.06 * d, x + self.w * 0.03 * d, y), STATIC)

    def ego_hood(self):
        """The camera car's own hood, as in every Cityscapes frame (void)."""
        w, h = self.w, self.h
        self.paint("chord", (w * 0.05, h * self.rng.uniform(0.88, 0.93), w * 0.95, h * 1.25), EGO, (22, 22, 26),
                   start=180, end=360)

    # ------------------------------------------------------------------ where things stand

    def place_objects(self):
        """[(ground row, draw)] for everything standing in the street; painted far to near afterwards."""
        rng, style, p, w = self.rng, self.style, self.style["p"], self.w
        road_l, road_r, out_l, out_r, draw = self.road_l, self.road_r, self.out_l, self.out_r, functools.partial
        objects = []
        for side, edge in ((-1, out_l), (1, out_r)):
            if rng.random() < p["fence"]:
                y0, y1 = sorted(self.hz + (self.h - self.hz) * rng.uniform(0.05, 1.0, 2))
                objects.append((y0, draw(self.fence, y0, y1, edge)))
            if rng.random() < p["wall"]:
                y0, y1 = sorted(self.hz + (self.h - self.hz) * rng.uniform(0.05, 0.9, 2))
                objects.append((y0, draw(self.wall, y0, y1, edge, side)))
        for _ in range(rng.integers(*style["poles"], endpoint=True)):
            y = self.ground_row(0.1)
            x = (out_l(y) + road_l(y)) / 2 if rng.random() < 0.5 else (out_r(y) + road_r(y)) / 2
            objects.append((y, draw(self.pole, y, x)))
        for _ in range(rng.integers(*style["trees"], endpoint=True)):
            y = self.ground_row(0.05)
            x = out_l(y) - w * rng.uniform(0.0, 0.1) if rng.random() < 0.5 else out_r(y) + w * rng.uniform(0.0, 0.1)
            objects.append((y, draw(self.tree, y, x)))
        for _ in range(rng.integers(*style["persons"], endpoint=True)):
            y = self.ground_row()
            x = rng.uniform(out_l(y), road_l(y)) if rng.random() < 0.5 else rng.uniform(road_r(y), out_r(y))
            objects.append((y, draw(self.person, y, x)))
        for _ in range(rng.integers(*style["cars"], endpoint=True)):
            y = self.ground_row(0.1)
            objects.append((y, draw(self.vehicle, y, self.on_road(y), CAR)))
        for cid, key in ((TRUCK, "truck"), (BUS, "bus")):
            if rng.random() < p[key]:
                y = self.ground_row(0.1, 0.7)
                objects.append((y, draw(self.vehicle, y, self.on_road(y), cid)))
        if rng.random() < p["train"]:
            y = self.ground_row(0.15, 0.45)
            objects.append((y, draw(self.train, y)))
        return objects + self.two_wheelers_and_clutter(p, ridden=0.7, clutter=0.5)

    def two_wheelers_and_clutter(self, p, ridden, clutter):
        """[(ground row, draw)] of a bicycle and a motorcycle, each with probability p[...] and ridden (on the road)
        with probability `ridden`, else parked by the kerb; then, with probability `clutter`, a bin on the pavement."""
        rng, draw, objects = self.rng, functools.partial, []
        for cid, key in ((BIKE, "bike"), (MOTO, "moto")):
            if rng.random() < p[key]:
                y = self.ground_row(0.2)
                on_road = rng.random() < ridden
                x = self.on_road(y) if on_road else rng.uniform(self.out_l(y), self.road_l(y))
                objects.append((y, draw(self.two_wheeler, y, x, cid, on_road)))
        if rng.random() < clutter:
            y = self.ground_row(0.2)
            objects.append((y, draw(self.static, y, rng.uniform(self.road_r(y), self.out_r(y)), self.depth(y))))
        return objects


def draw_scene(rng, size, style):
    """One street scene: (RGB uint8 H×W×3, Cityscapes label ids uint8 H×W), drawn flat."""
    scene = Scene(rng, size, style)
    scene.sky_and_buildings()
    scene.ground_and_road()
    for _, draw in sorted(scene.place_objects(), key=lambda o: o[0]):
        draw()
    if style is TARGET_STYLE:
        scene.ego_hood()
    return np.asarray(scene.rgb), np.asarray(scene.lab)


def camera_look(rng, rgb, lab):
    """Textures per class, lighting, blur and sensor noise: what separates the target from the game look."""
    h, w = lab.shape
    img = rgb.astype(np.float32)
    texture = np.zeros(256, np.float32)
    texture[[ROAD, SIDEWALK, BUILDING, WALL, VEG, TERRAIN]] = (0.12, 0.15, 0.18, 0.12, 0.35, 0.3)
    small = rng.normal(size=(max(2, h // 12), max(2, w // 12))).astype(np.float32)
    low = np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR))
    fine = rng.normal(size=(h, w)).astype(np.float32)
    img *= (1 + texture[lab] * (0.6 * low + 0.4 * fine))[..., None]
    gain = rng.uniform(0.65, 1.25) * (1 + rng.uniform(-0.08, 0.08, 3))  # exposure and white balance
    rows = 1 + rng.uniform(-0.25, 0.25) * np.linspace(-1, 1, h)[:, None, None]  # light falling across the frame
    img = img * gain * rows
    img = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(rng.uniform(0.6, 1.4)))
    img = np.asarray(img, np.float32) + rng.normal(0, rng.uniform(3, 8), (h, w, 1)) + rng.normal(0, 2, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- writing the two trees

def label_png(ids, palette):
    im = Image.fromarray(ids, "L")
    if palette:  # GTA-V ships palette PNGs whose indices are the ids
        im = im.convert("P")
        colours = np.zeros((256, 3), np.uint8)
        for l in CS_LABELS:
            if 0 <= l.id < 256:
                colours[l.id] = l.color
        im.putpalette(colours.ravel().tolist())
    return im


def write_source(folder, num, seed, size, progress, draw):
    """GTA-V's layout: images/00001.png, labels/00001.png (palette PNGs of ids), split.mat."""
    (folder / "images").mkdir(parents=True)
    (folder / "labels").mkdir()
    steps = range(num)
    if progress:
        from tqdm import tqdm
        steps = tqdm(steps, desc="source (game look)", leave=False)
    for i in steps:
        rgb, ids = draw(np.random.default_rng([seed, 0, i]), size)
        image = Image.fromarray(rgb)
        if i % 10 == 7:  # a few GTA-V frames come at another size than their labels
            image = image.resize((size[0] * 5 // 4, size[1] * 5 // 4), Image.BILINEAR)
        image.save(folder / "images" / f"{i + 1:05d}.png")
        label_png(ids, palette=True).save(folder / "labels" / f"{i + 1:05d}.png")
    names = [f"{i + 1:05d}" for i in range(num)]
    official = {s: seeded_split(names, s, "official", (0.5, 0.25)) for s in SPLITS}
    write_mat_vectors(folder / "split.mat", {f"{s}Ids": sorted(int(n) for n in official[s]) for s in SPLITS})


def write_target(folder, num, seed, size, progress, draw):
    """Cityscapes' layout: leftImg8bit/SPLIT/CITY/*_leftImg8bit.png, gtFine/SPLIT/CITY/*_gtFine_labelIds.png
    (grey PNGs of ids) and *_instanceIds.png; 3/4 train, 1/4 val, and a test split whose labels are void."""
    n_val = max(2, round(num * 0.25))
    n_test = max(1, round(num * 0.1))
    jobs = [("train", i) for i in range(num - n_val)] + [("val", i) for i in range(n_val)] + \
           [("test", i) for i in range(n_test)]
    if progress:
        from tqdm import tqdm
        jobs = tqdm(jobs, desc="target (camera look)", leave=False)
    for k, (split, i) in enumerate(jobs):
        rgb, ids = draw(np.random.default_rng([seed, 1, k]), size)
        city = TOY_CITIES[split][i % len(TOY_CITIES[split])]
        stem = f"{city}_{i:06d}_000019"
        (folder / "leftImg8bit" / split / city).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(folder / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
        gt = folder / "gtFine" / split / city
        gt.mkdir(parents=True, exist_ok=True)
        if split == "test":  # as in the real release: test label files exist but hold nothing but void
            ids = np.zeros_like(ids)
        label_png(ids, palette=False).save(gt / f"{stem}_gtFine_labelIds.png")
        if split != "test":
            # one instance per class (Cityscapes' encoding for groups): enough for the official evaluation
            Image.fromarray(ids.astype(np.uint16)).save(gt / f"{stem}_gtFine_instanceIds.png")


def game_frame(rng, size):
    return draw_scene(rng, size, SOURCE_STYLE)


def camera_frame(rng, size):
    rgb, ids = draw_scene(rng, size, TARGET_STYLE)
    return camera_look(rng, rgb, ids), ids


def make_toy(root, num_source=200, num_target=200, seed=0, source_size=TOY_SOURCE_SIZE,
             target_size=TOY_TARGET_SIZE, progress=False, frames=(game_frame, camera_frame)):
    """Write ROOT/gta5 and ROOT/cityscapes in the real layouts; same seed, same bytes. Both appear at once
    (built in a temporary folder, then renamed), so a half-made pair is never left behind. frames: what draws a
    source and a target frame from (rng, size); pair 2's come from toy2.make_toy."""
    root = Path(root)
    source, target = frames
    for sub in ("gta5", "cityscapes"):
        if (root / sub).exists():
            raise UserError(f"{root / sub}: already exists; remove it or choose another ROOT")
    if num_source < 10 or num_target < 10:
        raise UserError("make-toy needs at least 10 source and 10 target images (for 60/10/30 splits)")
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".toy-", dir=root))
    try:
        write_source(tmp / "gta5", num_source, seed, source_size, progress, source)
        write_target(tmp / "cityscapes", num_target, seed, target_size, progress, target)
        for sub in ("gta5", "cityscapes"):
            try:
                os.rename(tmp / sub, root / sub)
            except OSError:  # another process (a torchrun rank) made the same pair first: same seed, same bytes
                if not (root / sub).is_dir():
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
