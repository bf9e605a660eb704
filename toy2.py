"""The second built-in pair (make-toy --pair 2): GTA-V and Cityscapes differ in more than their look.

    python datasets.py make-toy data/toy2 --pair 2

Pair 1 (toy.py) draws both domains from one kind of street seen by one camera; only the look differs. Here
each domain has its own scene statistics, set from the published per-class pixel shares of the real datasets
(SHARES), its own cameras and its own object shapes:

- camera: the target comes from one car's camera (one pitch, one position in its lane, one object scale, the
  hood in the frame); the source from a game's many cameras (horizon, vanishing point, road width in the frame
  and an object scale drawn per frame, so objects come at other sizes for the same place in the frame);
- layout: the target is a city street between tall facades that come down to the sidewalk, lined with trees
  and parked cars (little sky, little terrain); the source has lower buildings behind grass verges and walls,
  more sky, more trucks, fewer people, signs and bicycles, fewer trams;
- shapes: a game car is a tall box with a boxy cabin and large wheels; the target's cars are low and long with
  a rounded cabin; the target's people have rounded bodies and bags, the game's are blocks;
- look: the target goes through toy.camera_look (textures, exposure, blur, noise) with pair 1's target
  colours; the source is drawn flat, in colours LOOK of the way from the target's towards pair 1's game
  colours (its cars keep the game's random colours, and its colours vary less from object to object).
  LOOK is the one calibrated parameter (docs/benchmark.md: set with baselines only, before any adaptation
  method ran on this pair).

The target's bytes do not depend on --look, so every calibration point shares one target (and one oracle).
"""
import functools

import numpy as np

import toy
from utils import UserError
from toy import (BIKE, BUILDING, BUS, CAR, FENCE, LIGHT, MOTO, PARKING, PERSON, POLE, RIDER, ROAD, SIDEWALK, SIGN, SKY,
                 TERRAIN, TRAIN, TRUCK, VEG, WALL)

# per-class pixel shares in percent of all pixels, as measured over each whole dataset by
# github.com/m-birke/automotive-segmentation-datasets (playing_for_data.md: GTA-V's 24,966 frames;
# cityscapes.md: Cityscapes' fine train + val, 3,475 frames); what make-toy --pair 2 is built to match
SHARES = {
    "gta5": {ROAD: 32.1, SIDEWALK: 8.28, BUILDING: 16.9, WALL: 1.84, FENCE: 0.63, POLE: 1.06, LIGHT: 0.134,
             SIGN: 0.081, VEG: 7.6, TERRAIN: 2.2, SKY: 13.5, PERSON: 0.362, RIDER: 0.031, CAR: 2.52, TRUCK: 1.13,
             BUS: 0.368, TRAIN: 0.065, MOTO: 0.032, BIKE: 0.005},
    "cityscapes": {ROAD: 32.7, SIDEWALK: 5.3, BUILDING: 20.1, WALL: 0.59, FENCE: 0.77, POLE: 1.12, LIGHT: 0.18,
                   SIGN: 0.5, VEG: 14.3, TERRAIN: 0.98, SKY: 3.5, PERSON: 1.1, RIDER: 0.13, CAR: 6.0, TRUCK: 0.24,
                   BUS: 0.23, TRAIN: 0.19, MOTO: 0.085, BIKE: 0.4},
}
OBJECTS = 2.0  # twice pair 1's object sizes at the target's camera: nearer a real camera's proportions
LOOK = 0.25  # the source's colours: 0 the target's, 1 pair 1's game colours (calibrated: docs/benchmark.md)

# each range is drawn uniformly per frame (a pair: (lo, hi)); counts are inclusive
SOURCE = {
    "camera": {"horizon": (0.25, 0.45), "vanish": (0.3, 0.7), "road": (0.5, 0.8), "height": (0.7, 1.5), "sidewalk": (0.35, 0.6), "far": (0.02, 0.06)},
    "roofs": (0.8, 2.0), "closed": 0.25, "verge": 0.4, "verge_width": (0.03, 0.12), "wall": 0.5, "fence": 0.9,
    "trees": (1, 4), "trunk": 0.5, "crown": (0.12, 0.2), "parked": 0.2, "cars": (0, 2), "persons": (0, 1), "poles": (3, 5),
    "sign": 0.15, "light": 0.3, "p": {"truck": 0.28, "bus": 0.05, "train": 0.03, "bike": 0.01, "moto": 0.015},
    "car": "game", "person": "game", "hood": False,
}
TARGET = {
    "camera": {"horizon": (0.42, 0.45), "vanish": (0.47, 0.53), "road": (0.7, 0.8), "height": (1.0, 1.0), "sidewalk": (0.15, 0.3), "far": (0.14, 0.2)},
    "roofs": (5.0, 12.0), "closed": 0.9, "verge": 0.1, "verge_width": (0.02, 0.06), "wall": 0.12, "fence": 0.9,
    "trees": (4, 7), "trunk": 0.5, "crown": (0.12, 0.2), "parked": 0.9, "cars": (0, 2), "persons": (2, 5), "poles": (4, 7),
    "sign": 0.55, "light": 0.35, "p": {"truck": 0.07, "bus": 0.06, "train": 0.05, "bike": 0.4, "moto": 0.05},
    "car": "real", "person": "real", "hood": True,
}


def source_colours(look):
    """The source's palette: `look` of the way from the target's colours to pair 1's game colours."""
    game, real = toy.SOURCE_STYLE["colours"], toy.TARGET_STYLE["colours"]
    return {c: tuple(int(round(r + look * (g - r))) for g, r in zip(game[c], real[c])) for c in game}


class Street(toy.Scene):
    """A street between facades, seen from a camera whose pitch, position and object scale the style draws.

    An object standing on ground row y is drawn (y - horizon) / (0.55 h) times its size at the target's frame
    foot, times the frame's object scale: as a pinhole camera sees it, its size grows with its row's distance
    below the horizon. The object scale (1 / "height" in the style) stands for the camera's height and focal
    length, which the road's width in the frame does not follow: the source's objects come at other sizes
    against the same road.
    """

    def __init__(self, rng, size, style, colours, jitter):
        self.canvas(rng, size, {"colours": colours, "jitter": jitter})
        self.kind, (w, h) = style, size
        cam = style["camera"]
        self.hz, self.vx = h * rng.uniform(*cam["horizon"]), w * rng.uniform(*cam["vanish"])
        self.cx, self.rb = self.vx + w * rng.uniform(-0.05, 0.05), w * rng.uniform(*cam["road"])
        self.scale = 1 / rng.uniform(*cam["height"])
        self.sw = self.rb * rng.uniform(*cam["sidewalk"])
        self.far = w * rng.uniform(*cam["far"]) / 2  # the road's half width where the street ends
        self.verge = self.rb * rng.uniform(*style["verge_width"]) * 4 if rng.random() < style["verge"] else 0.0

    def depth(self, y):
        return max(0.02, (y - self.hz) / (0.55 * self.h) * self.scale * OBJECTS)

    def base(self, side):
        """The facades' foot line on a side: (x at the horizon, x at the frame's foot)."""
        far = self.vx + side * self.far * 2.3
        return far, self.cx + side * (self.rb + self.sw + self.verge)

    # ------------------------------------------------------------------ the street

    def ground(self):
        w, h, hz = self.w, self.h, self.hz
        self.paint("rectangle", (0, 0, w, h), SKY)
        self.paint("rectangle", (0, hz, w, h), TERRAIN)  # the verge, where facades stand back
        if self.rng.random() < self.kind["closed"]:  # a building across the street's far end
            self.paint("rectangle", (self.vx - self.far * 2.3, hz - h * self.rng.uniform(0.3, 0.6),
                                     self.vx + self.far * 2.3, hz + 1), BUILDING)
        for side in (-1, 1):
            self.facades(side)
        road_l, road_r, out_l, out_r = self.road_l, self.road_r, self.out_l, self.out_r
        self.paint("polygon", [(out_l(hz), hz), (road_l(hz), hz), (road_l(h), h), (out_l(h), h)], SIDEWALK)
        self.paint("polygon", [(road_r(hz), hz), (out_r(hz), hz), (out_r(h), h), (road_r(h), h)], SIDEWALK)
        self.paint("polygon", [(road_l(hz), hz), (road_r(hz), hz), (road_r(h), h), (road_l(h), h)], ROAD)
        for y in np.arange(hz + (h - hz) * 0.1, h, (h - hz) * 0.18):
            self.lane_mark(y, y + (h - hz) * 0.07)
        if self.rng.random() < 0.2:
            y = hz + (h - hz) * self.rng.uniform(0.4, 0.8)
            y2 = y + h * 0.08
            self.paint("polygon", [(road_l(y), y), (road_l(y) + w * 0.08 * self.depth(y), y),
                                   (road_l(y2) + w * 0.1, y2), (road_l(y2), y2)], PARKING)

    def road_l(self, y):
        return self.lerp(self.vx - self.far, self.cx - self.rb, y)

    def road_r(self, y):
        return self.lerp(self.vx + self.far, self.cx + self.rb, y)

    def out_l(self, y):
        return self.lerp(self.vx - self.far * 2, self.cx - self.rb - self.sw, y)

    def out_r(self, y):
        return self.lerp(self.vx + self.far * 2, self.cx + self.rb + self.sw, y)

    def facades(self, side):
        """Buildings along one side, near to far, each a block whose roof line runs to the vanishing point;
        a gap between two now and then."""
        rng, h, w, hz = self.rng, self.h, self.w, self.hz
        far, near = self.base(side)
        # distance along the street ~ 1 / (row - horizon): blocks of equal length shrink towards the horizon
        dist = 0.25
        while dist < 12:
            length = rng.uniform(0.5, 1.6)
            rows = [hz + (h - hz) / d for d in (dist, dist + length)]
            xs = [far + (near - far) * (r - hz) / (h - hz) for r in rows]
            # a building's height in units of an object's height scale: its pixels at row r are k (r - horizon)
            k = rng.uniform(*self.kind["roofs"]) * self.scale / 0.55
            roofs = [r - (r - hz) * k for r in rows]
            if rng.random() < 0.12:  # a gap: a tree's crown behind the building line, else sky
                if rng.random() < 0.6:
                    self.paint("ellipse", (min(xs), min(roofs) * 0.6 + hz * 0.4, max(xs), rows[1]), VEG)
            else:
                self.paint("polygon", [(xs[0], rows[0]), (xs[1], rows[1]), (xs[1], roofs[1]), (xs[0], roofs[0])],
                           BUILDING)
                window = self.colour(BUILDING, tuple(int(v * 0.6) for v in self.style["colours"][BUILDING]))
                for f in np.arange(0.15, 0.9, rng.uniform(0.12, 0.2)):
                    band = [(xs[0], rows[0] - (rows[0] - roofs[0]) * f), (xs[1], rows[1] - (rows[1] - roofs[1]) * f),
                            (xs[1], rows[1] - (rows[1] - roofs[1]) * (f + 0.05)),
                            (xs[0], rows[0] - (rows[0] - roofs[0]) * (f + 0.05))]
                    self.paint("polygon", band, BUILDING, window)
            dist += length

    # ------------------------------------------------------------------ objects the pairs shape differently

    def car(self, y, x):
        """A car from behind: the game's is a tall box with a boxy cabin and big wheels; the target's is low and
        long with a rounded cabin."""
        d, h, w = self.depth(y), self.h, self.w
        col = self.random_colour(CAR, 20, 235) if self.kind["car"] == "game" else self.colour(CAR)
        if self.kind["car"] == "game":
            vw, vh = w * 0.1 * d, h * 0.09 * d
            self.paint("rectangle", (x - vw / 2, y - vh * 0.65, x + vw / 2, y - vh * 0.15), CAR, col)
            self.paint("rectangle", (x - vw * 0.38, y - vh, x + vw * 0.38, y - vh * 0.65), CAR, col)
            r = vh * 0.24
        else:
            vw, vh = w * 0.14 * d, h * 0.07 * d
            self.paint("rectangle", (x - vw / 2, y - vh * 0.55, x + vw / 2, y - vh * 0.12), CAR, col)
            self.paint("chord", (x - vw * 0.36, y - vh * 1.05, x + vw * 0.36, y - vh * 0.1), CAR, col, start=180, end=360)
            r = vh * 0.15
        for wx in (x - vw * 0.32, x + vw * 0.32):
            self.paint("ellipse", (wx - r, y - 2 * r, wx + r, y), CAR, (20, 20, 20))

    def person(self, y, x, cid=PERSON, lift=0.0):
        if self.kind["person"] == "game":
            return super().person(y, x, cid, lift)
        ph = self.h * 0.3 * self.depth(y)
        base, head = y - lift * ph, ph * 0.12
        self.paint("ellipse", (x - ph * 0.14, base - ph * 0.8, x + ph * 0.14, base - ph * 0.35), cid)
        if lift == 0:
            self.paint("rectangle", (x - ph * 0.1, base - ph * 0.45, x + ph * 0.1, base), cid)
            if self.rng.random() < 0.4:  # a bag
                self.paint("rectangle", (x + ph * 0.12, base - ph * 0.55, x + ph * 0.24, base - ph * 0.38), cid)
        self.paint("ellipse", (x - head, base - ph * 0.8 - 2 * head, x + head, base - ph * 0.8), cid,
                   self.colour(cid, (200, 160, 130)))

    def tree(self, y, x):
        d, w, h, rng = self.depth(y), self.w, self.h, self.rng
        trunk = h * self.kind["trunk"] * d
        self.paint("rectangle", (x - w * 0.007 * d, y - trunk, x + w * 0.007 * d, y), VEG)
        rx = w * rng.uniform(*self.kind["crown"]) * d
        ry = rx * rng.uniform(0.9, 1.3) * h / w * 2
        cy = y - trunk - ry * 0.6
        self.paint("ellipse", (x - rx, cy - ry, x + rx, cy + ry), VEG)

    def pole(self, y, x):
        d, w, h, rng = self.depth(y), self.w, self.h, self.rng
        top = y - h * 0.55 * d
        self.paint("rectangle", (x - w * 0.004 * d - 0.5, top, x + w * 0.004 * d + 0.5, y), POLE)
        kind = rng.random()
        if kind < self.kind["light"]:
            bw, bh = w * 0.016 * d + 1, h * 0.09 * d + 2
            self.paint("rectangle", (x - bw, top - bh, x + bw, top), LIGHT)
        elif kind < self.kind["light"] + self.kind["sign"]:
            r = w * 0.024 * d + 1.5
            if rng.random() < 0.5:
                self.paint("ellipse", (x - r, top - 2 * r, x + r, top), SIGN)
            else:
                self.paint("rectangle", (x - r, top - 1.6 * r, x + r, top), SIGN)

    # ------------------------------------------------------------------ where things stand

    def place_objects(self):
        rng, style, p, w, h, draw = self.rng, self.kind, self.kind["p"], self.w, self.h, functools.partial
        road_l, road_r, out_l, out_r = self.road_l, self.road_r, self.out_l, self.out_r
        objects = []
        for side, edge in ((-1, out_l), (1, out_r)):
            if rng.random() < style["wall"]:
                y0, y1 = sorted(self.hz + (h - self.hz) * rng.uniform(0.05, 1.0, 2))
                outer = lambda y, e=edge, s=side: e(y) + s * self.verge * 0.7 * (y - self.hz) / (h - self.hz)
                objects.append((y0, draw(self.wall, y0, y1, outer, side)))
            if rng.random() < style["fence"]:
                y0, y1 = sorted(self.hz + (h - self.hz) * rng.uniform(0.05, 0.7, 2))
                objects.append((y0, draw(self.fence, y0, y1, edge)))
            if rng.random() < style["parked"]:  # a row of parked cars along this curb
                y = self.ground_row(0.08, 0.3)
                kerb = road_l if side < 0 else road_r
                while y < h * 1.02:
                    objects.append((y, draw(self.car, y, kerb(y) - side * w * 0.1 * self.depth(y))))
                    y += (y - self.hz) * rng.uniform(0.45, 0.9)
        for _ in range(rng.integers(*style["trees"], endpoint=True)):
            y = self.ground_row(0.05, 0.5)
            x = (out_l(y) + road_l(y)) / 2 * 0.3 + out_l(y) * 0.7 if rng.random() < 0.5 else \
                (out_r(y) + road_r(y)) / 2 * 0.3 + out_r(y) * 0.7
            objects.append((y, draw(self.tree, y, x)))
        for _ in range(rng.integers(*style["poles"], endpoint=True)):
            y = self.ground_row(0.1)
            x = (out_l(y) + road_l(y)) / 2 if rng.random() < 0.5 else (out_r(y) + road_r(y)) / 2
            objects.append((y, draw(self.pole, y, x)))
        for _ in range(rng.integers(*style["persons"], endpoint=True)):
            y = self.ground_row()
            x = rng.uniform(out_l(y), road_l(y)) if rng.random() < 0.5 else rng.uniform(road_r(y), out_r(y))
            objects.append((y, draw(self.person, y, x)))
        for _ in range(rng.integers(*style["cars"], endpoint=True)):
            y = self.ground_row(0.1)
            objects.append((y, draw(self.car, y, self.on_road(y))))
        for cid, key in ((TRUCK, "truck"), (BUS, "bus")):
            if rng.random() < p[key]:
                y = self.ground_row(0.1, 0.6)
                objects.append((y, draw(self.vehicle, y, self.on_road(y), cid)))
        if rng.random() < p["train"]:  # a tram in the street
            y = self.ground_row(0.1, 0.4)
            objects.append((y, draw(self.vehicle, y, self.on_road(y), TRAIN)))
        return objects + self.two_wheelers_and_clutter(p, ridden=0.4, clutter=0.4)

    def vehicle(self, y, x, cid):
        if cid != TRAIN:
            return super().vehicle(y, x, cid)
        d = self.depth(y)  # a tram: a long box in the street, no rails across the frame
        vw, vh = self.w * 0.5 * d, self.h * 0.3 * d
        col = self.colour(TRAIN)
        self.paint("rectangle", (x - vw / 2, y - vh, x + vw / 2, y), TRAIN, col)
        for wx in np.arange(x - vw * 0.45, x + vw * 0.4, vw * 0.12):
            self.paint("rectangle", (wx, y - vh * 0.85, wx + vw * 0.08, y - vh * 0.5), TRAIN,
                       tuple(int(v * 0.45) for v in col))


def draw(rng, size, style, look=LOOK):
    """One frame of a domain: (RGB uint8 H×W×3, label ids uint8 H×W); the target through the camera."""
    target = style is TARGET
    colours = toy.TARGET_STYLE["colours"] if target else source_colours(look)
    scene = Street(rng, size, style, colours, toy.TARGET_STYLE["jitter"] if target else toy.SOURCE_STYLE["jitter"])
    scene.ground()
    for _, paint in sorted(scene.place_objects(), key=lambda o: o[0]):
        paint()
    if style["hood"]:
        scene.ego_hood()
    rgb, lab = np.asarray(scene.rgb), np.asarray(scene.lab)
    return (toy.camera_look(rng, rgb, lab) if target else rgb), lab


def make_toy(root, num_source=200, num_target=200, seed=0, look=None, **kw):
    """toy.make_toy with this pair's frames, the source at `look` (None: LOOK, the calibrated one)."""
    look = LOOK if look is None else look
    if not 0 <= look <= 1:
        raise UserError(f"--look {look}: from 0 (the target's colours) to 1 (pair 1's game colours)")
    frames = functools.partial(draw, style=SOURCE, look=look), functools.partial(draw, style=TARGET)
    return toy.make_toy(root, num_source, num_target, seed, frames=frames, **kw)
