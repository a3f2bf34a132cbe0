"""MortarMayhem-Grid-v0 and MysteryPath-Grid-v0 without pygame in the step: ``env.backend: fast``.

memory-gym 1.0.2 draws every frame with pygame (a fresh arena or path surface each reset, blits,
``display.flip``, ``surfarray.array3d``): on a CPU that is most of an env step. These classes play
the same games with the same random draws and compose each frame from pieces that memory-gym's
own asset classes (``MortarArena``, ``Command``, ``GridCharacterController``, ``Node``) drew with
pygame once per process: a piece is a set of screen pixels (flat indices into the 84x84x3 frame,
in memory-gym's transposed x/y layout) and their values, found by drawing it on a black and on a
white screen and keeping the pixels that agree (a colour-keyed sprite's transparent pixels take the
screen's colour). A frame is a copy of the current background plus one indexed assignment per
sprite, so it holds exactly the bytes memory-gym's display holds after the same draws. With
``env.downsample``, :class:`PooledObservation` gives :class:`~ppo_tbptt.envs.wrappers.DownsampleObservation`'s
frames from each background pooled once and the blocks under the sprites pooled (memoised).

Exactness, what it rests on, checked against memory-gym itself in ``tests/test_fast_grid.py``:

- the same calls on ``self.np_random`` (seeded by ``reset(seed=...)``) in the same order:
  spawn tile, command count, commands, show duration and delay, explosion duration and delay
  (Mortar Mayhem); origin side, origin and goal, then memory-gym's own ``MysteryPath`` generator
  (Mystery Path);
- memory-gym's own reset-parameter check and defaults (``process_reset_params``) and its
  ``calc_max_episode_steps``;
- the step logic ported line by line, including reward arithmetic in the same order (so float
  sums are bit-identical), Mortar Mayhem's success flag as memory-gym sets it (wrong after a
  failed last command; :class:`~ppo_tbptt.envs.memorygym.MortarMayhemTrueSuccess` recomputes it
  from the attributes it reads on memory-gym's env, which these classes keep under the same names),
  and the info dicts with the same keys and values;
- Mystery Path's fall-off cross (drawn with surface alpha) is composed once per cell and heading
  over the agent on the black off-path tile it always lies on, as pygame blends it.

``render()`` (``rgb_array``) returns the current frame upright, as memory-gym's does for the env
that drew last; ``human`` and ``debug_rgb_array`` are refused.
"""
from __future__ import annotations

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from .wrappers import DownsampleObservation

SCREEN = 84
FAST_IDS = ("MortarMayhem-Grid-v0", "MysteryPath-Grid-v0")

# GridCharacterController: rotation 0/90/180/270 faces north/west/south/east
_FORWARD = {0: (0, -1), 90: (-1, 0), 180: (0, 1), 270: (1, 0)}
_HEADINGS = (0, 90, 180, 270)


# ---- pieces drawn once per process by pygame ------------------------------------------------------
def _pygame():
    import os
    for k, v in (("SDL_VIDEODRIVER", "dummy"), ("SDL_AUDIODRIVER", "dummy"), ("PYGAME_HIDE_SUPPORT_PROMPT", "1")):
        os.environ.setdefault(k, v)
    import pygame
    return pygame


def _snapshot(draw, fill) -> np.ndarray:
    """The 84x84x3 screen (surfarray layout [x, y, c]) after ``fill`` and ``draw(surface)``."""
    pygame = _pygame()
    surface = pygame.Surface((SCREEN, SCREEN))
    surface.fill(fill)
    draw(surface)
    return pygame.surfarray.array3d(surface)


class Piece:
    """Pixels a draw call sets whatever lies below: flat indices into the frame and their values.

    ``region`` (an [84, 84] mask) instead takes those pixels of ``draw`` on a black screen (for a
    sprite blended over a known part of the screen)."""

    __slots__ = ("index", "values", "_blocks")

    def __init__(self, draw, region: np.ndarray | None = None):
        black = _snapshot(draw, (0, 0, 0))
        if region is None:
            region = (black == _snapshot(draw, (255, 255, 255))).all(axis=2)
        idx = np.flatnonzero(np.repeat(region[:, :, None], 3, axis=2))
        self.index = idx.astype(np.intp)
        self.values = black.reshape(-1)[idx].copy()
        self._blocks: dict = {}

    def paste(self, flat: np.ndarray) -> None:
        flat[self.index] = self.values

    def blocks(self, factor: int) -> tuple[slice, slice, slice, slice]:
        """The factor x factor pooling blocks it touches: (block x, block y, pixel x, pixel y) slices."""
        if factor not in self._blocks:
            x, y = self.index // (SCREEN * 3), (self.index // 3) % SCREEN
            bx = slice(int(x.min()) // factor, int(x.max()) // factor + 1) if x.size else slice(0, 0)
            by = slice(int(y.min()) // factor, int(y.max()) // factor + 1) if y.size else slice(0, 0)
            self._blocks[factor] = (bx, by, slice(bx.start * factor, bx.stop * factor),
                                    slice(by.start * factor, by.stop * factor))
        return self._blocks[factor]


_POOL_CACHE = 20_000  # pooled sprite patches kept per process (a few MB)


def pool_blocks(pixels: np.ndarray, factor: int) -> np.ndarray:
    """Mean of each factor x factor block of uint8 ``pixels`` [X, Y, 3], rounded half up: the
    integer form of :class:`~ppo_tbptt.envs.wrappers.DownsampleObservation`'s
    ``floor((sum + n/2) / n)`` (n = factor^2)."""
    w, h = pixels.shape[0] // factor, pixels.shape[1] // factor
    total = pixels.reshape(w, factor, h, factor, pixels.shape[2]).sum(axis=(1, 3), dtype=np.uint32)
    n = factor * factor
    return ((2 * total + n) // (2 * n)).astype(np.uint8)


_MM_ART: dict = {}
_MP_ART: dict = {}


class _MortarArt:
    """Backgrounds (tiles off; tiles on around each target) and sprites for one arena size."""

    def __init__(self, arena_size: int):
        from memory_gym.character_controller import GridCharacterController
        from memory_gym.mortar_mayhem_grid import SCALE
        from memory_gym.pygame_assets import Command, MortarArena
        n = self.n = arena_size

        def arena(target=None):
            a = MortarArena(SCALE, n)
            a.rect.center = (SCREEN // 2, SCREEN // 2)
            if target is not None:
                a.toggle_tiles(target, True)
            return a

        def background(a):
            return _snapshot(lambda s: s.blit(a.surface, a.rect), (0, 0, 0))

        # [1 + n*n] backgrounds: 0 = tiles off, 1 + i*n + j = every tile red but the target (i, j)
        self.pooled: dict = {}  # factor -> {background index: pooled background}
        self.pooled_sprites: dict = {}  # (factor, *pieces, background index) -> pooled patches
        self.backgrounds = np.stack([background(arena())] +
                                    [background(arena((i, j))) for i in range(n) for j in range(n)])
        # the agent at every tile and heading (positions as memory-gym's controller sets them)
        a = arena()
        grid = a.to_grid()
        self.agent = {}
        for i in range(n):
            for j in range(n):
                ctrl = GridCharacterController(SCALE, (i, j), grid)
                rect = ctrl.rect.copy()
                norm = ((rect.center[0] - a.rect[0]) // a.tile_dim, (rect.center[1] - a.rect[1]) // a.tile_dim)
                if norm != (i, j):  # the grid index is the env's normalized position
                    raise RuntimeError(f"MortarMayhem-Grid tile {(i, j)} normalizes to {norm}")
                for h in _HEADINGS:
                    surf, _ = ctrl.get_rotated_sprite(h)
                    self.agent[i, j, h] = Piece(lambda s, surf=surf, rect=rect: s.blit(surf, rect))
        # commands as shown in the screen's centre ("" shows nothing)
        self.commands = {}
        for name in [""] + list(Command.COMMANDS):
            c = Command(name, SCALE)
            pos = ((SCREEN // 2) - c.rect_dim // 2, (SCREEN // 2) - c.rect_dim // 2)
            self.commands[name] = Piece(lambda s, c=c, pos=pos: s.blit(c.surface, pos))


def mortar_art(arena_size: int) -> _MortarArt:
    art = _MM_ART.get(arena_size)
    if art is None:
        art = _MM_ART[arena_size] = _MortarArt(arena_size)
    return art


class _PathArt:
    """Mystery Path's 7x7 cells: origin and goal tiles, the agent, the agent with the fall-off cross."""

    def __init__(self, grid_dim: int = 7):
        from memory_gym.character_controller import GridCharacterController
        from memory_gym.mystery_path_grid import SCALE
        from memory_gym.pygame_assets import MysteryPath, Node
        pygame = _pygame()
        self.grid_dim = g = grid_dim
        tile_dim = SCREEN / g
        self.goal, self.origin, self.agent, self.cross = {}, {}, {}, {}
        grid = MysteryPath(g, g, (0, 0), (g - 1, 0), np.random.default_rng(0)).to_grid(tile_dim)
        dim = 40 * SCALE
        for i in range(g):
            for j in range(g):
                self.goal[i, j] = Piece(lambda s, i=i, j=j: Node(i, j).draw_to_surface(s, tile_dim, (0, 255, 0)))
                self.origin[i, j] = Piece(lambda s, i=i, j=j: Node(i, j).draw_to_surface(s, tile_dim, (0, 0, 255)))
                ctrl = GridCharacterController(SCALE, (i, j), grid, 0)
                rect = ctrl.rect.copy()
                # the fall-off cross as memory-gym's reset draws it, shown (alpha 255) over the agent
                cross = pygame.Surface((dim, dim))
                cross_rect = cross.get_rect()
                cross.fill(0)
                cross.set_colorkey(0)
                pygame.draw.line(cross, (255, 0, 0), (0, 0), (dim - 1, dim - 1), int(12 * SCALE))
                pygame.draw.line(cross, (255, 0, 0), (dim - 1, 0), (0, dim - 1), int(12 * SCALE))
                cross.set_alpha(255)
                cross_rect.center = rect.center
                if not pygame.Rect(0, 0, SCREEN, SCREEN).contains(cross_rect):
                    raise RuntimeError(f"MysteryPath-Grid: the fall-off cross at {cross_rect} leaves the screen")
                region = np.zeros((SCREEN, SCREEN), bool)  # the cross's drawn (not colour-keyed) pixels
                x0, y0 = cross_rect.topleft
                region[x0:x0 + cross_rect.w, y0:y0 + cross_rect.h] = pygame.surfarray.array3d(cross).any(axis=2)
                for h in _HEADINGS:
                    surf, _ = ctrl.get_rotated_sprite(h)
                    self.agent[i, j, h] = Piece(lambda s, surf=surf, rect=rect: s.blit(surf, rect))
                    # the off-path tile under the cross is black: draw the agent, then the cross
                    self.cross[i, j, h] = Piece(lambda s, surf=surf, rect=rect, c=cross, r=cross_rect:
                                                (s.blit(surf, rect), s.blit(c, r)), region=region)
        self.background = np.zeros((SCREEN, SCREEN, 3), np.uint8)
        self.pooled_sprites: dict = {}  # (factor, *pieces, background under them) -> pooled patches


def path_art() -> _PathArt:
    art = _MP_ART.get(7)
    if art is None:
        art = _MP_ART[7] = _PathArt(7)
    return art


# ---- the envs ------------------------------------------------------------------------------------
class _FastGridEnv(gym.Env):
    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, render_mode: str | None = None):
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"env.backend fast renders only rgb_array frames, not {render_mode!r} "
                             f"(use env.backend memorygym to watch or debug an episode)")
        self.render_mode = render_mode
        self.screen_dim = SCREEN
        self.action_space = spaces.Discrete(4)
        self.observation_space = spaces.Box(low=0, high=255, shape=[SCREEN, SCREEN, 3], dtype=np.uint8)
        self.has_ground_truth_info = False
        self._frame: np.ndarray | None = None
        self._pasted: list = []  # the pieces drawn over the background in the current frame
        self._pool_factor = 0

    def pool_observations(self, factor: int, pool) -> None:
        """Have :meth:`pooled_observation` average-pool frames by ``factor``; ``pool(frame)`` pools a
        whole frame (used once per background)."""
        self._pool_factor, self._pool_frame = int(factor), pool

    def pooled_observation(self) -> np.ndarray:
        """The current frame pooled: the pooled background with the blocks under the sprites pooled
        from the frame, memoised under a key that determines those pixels (:meth:`_sprite_key`)."""
        f = self._pool_factor
        out = self._pooled_background().copy()
        cache = self._art.pooled_sprites
        key = (f, *self._pasted, self._sprite_key())
        patches = cache.get(key)
        if patches is None:
            patches = []
            for piece in self._pasted:
                bx, by, px, py = piece.blocks(f)
                patches.append((bx, by, pool_blocks(self._frame[px, py], f)))
            if len(cache) >= _POOL_CACHE:
                cache.clear()
            cache[key] = patches
        for bx, by, patch in patches:
            out[bx, by] = patch
        return out

    def render(self):
        if self.render_mode == "rgb_array" and self._frame is not None:
            return np.ascontiguousarray(self._frame.transpose(1, 0, 2))
        return None

    def close(self):
        pass  # nothing to free (memory-gym's close() quits pygame for the whole process)


class FastGridMortarMayhem(_FastGridEnv):
    """memory-gym 1.0.2's ``GridMortarMayhemEnv`` (MortarMayhem-Grid-v0), frames composed in numpy."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 6}

    def reset(self, seed=None, return_info=True, options=None):
        from memory_gym.mortar_mayhem_grid import GridMortarMayhemEnv
        from memory_gym.pygame_assets import Command, calc_max_episode_steps
        super().reset(seed=seed)
        rng = self.np_random
        self.current_seed = seed
        p = self.reset_params = GridMortarMayhemEnv.process_reset_params(options)
        self.max_episode_steps = calc_max_episode_steps(max(p["command_count"]), max(p["command_show_duration"]),
                                                        max(p["command_show_delay"]), max(p["explosion_delay"]),
                                                        max(p["explosion_duration"]))
        self._rewards, self._length = [], 0  # summed by sum() as memory-gym does (Python's float sum)
        n = p["arena_size"]
        self._art = mortar_art(n)
        flat = rng.integers(0, n ** 2)
        pos = (int(flat // n), int(flat % n))
        self.normalized_agent_position = pos
        self._rotation = 0
        # the command sequence: each command one that keeps the simulated agent on the arena
        moves = self._moves = Command.COMMANDS
        keys = list(moves)[:p["allowed_commands"]]
        self.num_commands = rng.choice(p["command_count"])
        commands, sim = [], pos
        for _ in range(self.num_commands):
            valid = [k for k in keys if 0 <= sim[0] + moves[k][0] < n and 0 <= sim[1] + moves[k][1] < n]
            sample = valid[rng.integers(0, len(valid))]
            commands.append(sample)
            sim = (sim[0] + moves[sample][0], sim[1] + moves[sample][1])
        self._commands = commands
        duration = rng.choice(p["command_show_duration"])
        delay = rng.choice(p["command_show_delay"])
        self._visualization = []  # what each step until the agent may move shows ("": nothing)
        for c in commands:
            self._visualization += [c] * int(duration) + [""] * int(delay)
        self._shown = 1  # the reset frame shows the first entry
        first = self._visualization[0]
        self._target_pos = (pos[0] + moves[commands[0]][0], pos[1] + moves[commands[0]][1])
        self._current_command = 0
        self._command_steps = 0
        self._command_verify_step = 0
        self._explosion_duration = rng.choice(p["explosion_duration"])
        self._explosion_delay = rng.choice(p["explosion_delay"])
        self._tiles_on = False
        self._background = 0
        self._draw(0, first)
        return self._frame, {}

    @property
    def _command_visualization(self) -> bool:
        """Whether commands are still being shown (memory-gym's list is non-empty)."""
        return self._shown < len(self._visualization)

    def _draw(self, rotation: int, command: str | None) -> None:
        art = self._art
        frame = art.backgrounds[self._background].copy()
        flat = frame.reshape(-1)
        x, y = self.normalized_agent_position
        self._pasted = [art.agent[x, y, rotation]] + ([] if command is None else [art.commands[command]])
        for piece in self._pasted:
            piece.paste(flat)
        self._frame = frame

    def _sprite_key(self):
        """With the pasted pieces, what fixes the frame under them: the background."""
        return self._background

    def _pooled_background(self) -> np.ndarray:
        pooled = self._art.pooled.setdefault(self._pool_factor, {})
        if self._background not in pooled:
            pooled[self._background] = self._pool_frame(self._art.backgrounds[self._background])
        return pooled[self._background]

    def step(self, action):
        p = self.reset_params
        reward = 0
        done = False
        success = 0
        command = None
        if self._shown < len(self._visualization):  # show the commands one by one; the agent waits
            command = self._visualization[self._shown]
            self._shown += 1
            rotation = 0
        else:
            # GridCharacterController.step: 1 turns left, 2 right, 3 moves forward inside the arena
            if action == 1:
                self._rotation = (self._rotation + 90) % 360
            if action == 2:
                self._rotation = (self._rotation - 90) % 360
            rotation = self._rotation
            if action == 3:
                dx, dy = _FORWARD[rotation]
                x, y = self.normalized_agent_position
                if 0 <= x + dx < self._art.n and 0 <= y + dy < self._art.n:
                    self.normalized_agent_position = (x + dx, y + dy)
            verify = self._command_steps % self._explosion_delay == 0 and self._command_steps > 0
            if verify and not self._tiles_on:
                if self._current_command < self.num_commands:
                    self._current_command += 1
                    self._tiles_on = True
                    if p["visual_feedback"]:
                        t = self._target_pos
                        self._background = 1 + int(t[0]) * self._art.n + int(t[1])
                    if self.normalized_agent_position == self._target_pos:
                        reward += p["reward_command_success"]
                    else:
                        done = True
                        reward += p["reward_command_failure"]
                if self._current_command >= self.num_commands:
                    done = True
                    success = 1
                    reward += p["reward_episode_success"]
                self._command_steps = 1
            if self._tiles_on:
                if self._command_verify_step % self._explosion_duration == 0 and self._command_verify_step > 0:
                    self._tiles_on = False
                    self._background = 0
                    self._command_verify_step = 0
                    if self._current_command < self.num_commands:
                        move = self._moves[self._commands[self._current_command]]
                        self._target_pos = (self._target_pos[0] + move[0], self._target_pos[1] + move[1])
                else:
                    if not self.normalized_agent_position == self._target_pos:
                        done = True
                        reward = p["reward_command_failure"]
                    self._command_verify_step += 1
            else:
                self._command_steps += 1
        self._rewards.append(reward)
        self._length += 1
        if done:
            info = {"reward": sum(self._rewards), "length": self._length, "success": success,
                    "commands_completed": (self._current_command - 1 + success) / self.num_commands}
        else:
            info = {}
        self._draw(rotation, command)
        return self._frame, reward, done, False, info


class FastGridMysteryPath(_FastGridEnv):
    """memory-gym 1.0.2's ``GridMysteryPathEnv`` (MysteryPath-Grid-v0), frames composed in numpy."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 3}

    def __init__(self, render_mode: str | None = None):
        super().__init__(render_mode)
        self.grid_dim = 7
        self.tile_dim = SCREEN / self.grid_dim

    def reset(self, seed=None, return_info=True, options=None):
        from memory_gym.mystery_path_grid import GridMysteryPathEnv
        from memory_gym.pygame_assets import MysteryPath
        super().reset(seed=seed)
        rng = self.np_random
        self.current_seed = seed
        self.t = 0
        p = self.reset_params = GridMysteryPathEnv.process_reset_params(options)
        self.max_episode_steps = p["max_steps"]
        self._rewards, self._length = [], 0  # summed by sum() as memory-gym does (Python's float sum)
        g = self.grid_dim
        cardinal_origin = rng.choice(p["cardinal_origin_choice"])
        if cardinal_origin == 0:
            self.start = (0, rng.integers(0, g))
            self.end = (g - 1, rng.integers(0, g))
        elif cardinal_origin == 1:
            self.start = (g - 1, rng.integers(0, g))
            self.end = (0, rng.integers(0, g))
        elif cardinal_origin == 2:
            self.start = (rng.integers(0, g), 0)
            self.end = (rng.integers(0, g), g - 1)
        else:
            self.start = (rng.integers(0, g), g - 1)
            self.end = (rng.integers(0, g), 0)
        self.mystery_path = MysteryPath(g, g, self.start, self.end, rng)
        path = self.mystery_path.path  # goal first, origin last
        self._path_index = {}
        for k, node in enumerate(path):
            self._path_index.setdefault((node.x, node.y), k)
        art = self._art = path_art()
        bg = art.background.copy()
        flat = bg.reshape(-1)
        for k, node in enumerate(path):  # MysteryPath.draw_to_surface, path and walls hidden
            if k == 0 and p["show_goal"]:
                art.goal[node.x, node.y].paste(flat)
            elif k == len(path) - 1 and p["show_origin"]:
                art.origin[node.x, node.y].paste(flat)
        self._background = bg
        self._pooled = None
        self._start_cell = (int(self.start[0]), int(self.start[1]))
        self._cell = self._start_cell
        self.normalized_agent_position = self._start_cell
        self._rotation = 0
        self._cross_visible = False
        self._cross_cell = self._cell
        self.is_off_path = False
        self.num_fails = 0
        self._draw()
        return self._frame, {}

    def _draw(self) -> None:
        frame = self._background.copy()
        flat = frame.reshape(-1)
        art = self._art
        self._pasted = [art.agent[self._cell + (self._rotation,)]]
        if self._cross_visible:
            self._pasted.append(art.cross[self._cross_cell + (self._rotation,)])
        for piece in self._pasted:
            piece.paste(flat)
        self._frame = frame

    def _sprite_key(self) -> bytes:
        """With the pasted pieces, what fixes the frame under them: the background's pixels in the
        blocks they touch (black but for a shown origin or goal nearby)."""
        f = self._pool_factor
        x0 = y0 = SCREEN
        x1 = y1 = 0
        for piece in self._pasted:
            _, _, px, py = piece.blocks(f)
            x0, x1, y0, y1 = min(x0, px.start), max(x1, px.stop), min(y0, py.start), max(y1, py.stop)
        return self._background[x0:x1, y0:y1].tobytes()

    def _pooled_background(self) -> np.ndarray:
        if self._pooled is None:
            self._pooled = self._pool_frame(self._background)
        return self._pooled

    def step(self, action):
        p = self.reset_params
        reward = 0
        done = False
        success = 0
        if not self.is_off_path:
            if action == 1:
                self._rotation = (self._rotation + 90) % 360
            if action == 2:
                self._rotation = (self._rotation - 90) % 360
            if action == 3:
                dx, dy = _FORWARD[self._rotation]
                x, y = self._cell
                if 0 <= x + dx < self.grid_dim and 0 <= y + dy < self.grid_dim:
                    self._cell = (x + dx, y + dy)
        else:  # back to the origin after a fall
            self._cell = self._start_cell
        self.normalized_agent_position = self._cell
        if self._cell == self.end:
            reward += p["reward_goal"]
            done = True
            success = 1
        else:
            k = self._path_index.get(self._cell)
            if k is not None:
                node = self.mystery_path.path[k]
                if not node.reward_visited and not self._cell == self.start and not self._cell == self.end:
                    reward += p["reward_path_progress"]
                    node.reward_visited = True
                self._cross_visible = False
                self.is_off_path = False
            else:
                reward += p["reward_fall_off"]
                self.num_fails += 1
                if p["visual_feedback"]:
                    self._cross_visible = True
                self.is_off_path = True
            self._cross_cell = self._cell
        reward += p["reward_step"]
        self._rewards.append(reward)
        self._length += 1
        self.t += 1
        if self.t == self.max_episode_steps:
            done = True
        if done:
            info = {"reward": sum(self._rewards), "length": self._length, "success": success,
                    "num_fails": self.num_fails}
        else:
            info = {}
        self._draw()
        return self._frame, reward, done, False, info


class PooledObservation(DownsampleObservation):
    """``env.downsample`` on a fast env: the frames :class:`DownsampleObservation` would give,
    with only the blocks under the sprites pooled per step (each background is pooled once)."""

    def __init__(self, env: gym.Env, factor: int):
        super().__init__(env, factor)
        self._fast = env.unwrapped
        self._fast.pool_observations(self.factor, self._pool)

    def observation(self, observation):
        return self._fast.pooled_observation()


FAST_ENVS = {"MortarMayhem-Grid-v0": FastGridMortarMayhem, "MysteryPath-Grid-v0": FastGridMysteryPath}


def make_fast_env(env_id: str, kwargs: dict | None = None, render_mode: str | None = None) -> gym.Env:
    """The fast env for ``env_id`` (one of :data:`FAST_IDS`); ValueError for any other id."""
    if env_id not in FAST_ENVS:
        raise ValueError(f"env.backend fast has no {env_id!r} (it has {', '.join(FAST_IDS)})")
    return FAST_ENVS[env_id](render_mode=render_mode, **dict(kwargs or {}))
