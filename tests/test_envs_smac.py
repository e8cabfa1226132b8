"""SMACv1/SMACv2 wrappers against a stand-in that speaks the real packages' API.

The stand-in modules ``smac.env`` and ``smacv2.env`` are put into ``sys.modules`` by
the tests. They have the real constructors' keyword arguments (unknown ones are a
TypeError, unknown maps a KeyError from the map registry), the real return types
(``get_obs`` a list of float32 arrays, ``get_avail_actions`` a list of int lists,
``step`` -> ``(reward, terminated, info)`` with ``battle_won`` always and
``episode_limit`` only with ``continuing_episode=True``), and SMACv2's capability
wrapper, which adds ``n_units``/``n_enemies`` to each distribution config and draws a
team per reset. The battle is a toy: attacking an enemy takes one of its two hit
points, an agent that chooses "stop" dies.

The real game is exercised by ``test_real_starcraft`` only where it is installed."""

import importlib.util
import os
import sys
import types

import numpy as np
import pytest

from common.envs import SMACV2_RACES, SMACV2_TASKS, EnvError, evaluate, make_env, smacv2_capability_config

MAP_PARAMS = {  # the packages' registries: n_agents, n_enemies, limit
    "3m": (3, 3, 60), "5m_vs_6m": (5, 6, 70), "corridor": (6, 24, 400),
    "10gen_protoss": (10, 10, 200), "10gen_terran": (10, 10, 200), "10gen_zerg": (10, 10, 200),
}


class FakeStarCraft2Env:
    """smac.env.StarCraft2Env's interface over a toy battle."""

    KWARGS = {"step_mul", "move_amount", "difficulty", "game_version", "seed", "continuing_episode",
              "obs_all_health", "obs_own_health", "obs_last_action", "obs_pathing_grid", "obs_terrain_height",
              "obs_instead_of_state", "obs_timestep_number", "state_last_action", "state_timestep_number",
              "reward_sparse", "reward_only_positive", "reward_death_value", "reward_win", "reward_defeat",
              "reward_negative_scale", "reward_scale", "reward_scale_rate", "replay_dir", "replay_prefix",
              "window_size_x", "window_size_y", "heuristic_ai", "heuristic_rest", "debug"}
    instances = []

    def __init__(self, map_name="8m", **kwargs):
        unknown = set(kwargs) - self.KWARGS
        if unknown:
            raise TypeError(f"__init__() got an unexpected keyword argument '{sorted(unknown)[0]}'")
        self.map_name, self.kwargs = map_name, kwargs
        self.n_agents, self.n_enemies, self.episode_limit = MAP_PARAMS[map_name]  # KeyError like get_map_params
        self.continuing_episode = kwargs.get("continuing_episode", False)
        self.n_actions = 6 + self.n_enemies
        self.launched = self.closed = False
        self.episode_config = None
        FakeStarCraft2Env.instances.append(self)

    def get_obs_size(self):
        return 4 + 5 * self.n_enemies + 5 * (self.n_agents - 1) + 1

    def get_state_size(self):
        return 4 * self.n_agents + 3 * self.n_enemies + self.n_agents * self.n_actions

    def get_total_actions(self):
        return self.n_actions

    def get_env_info(self):
        return {"state_shape": self.get_state_size(), "obs_shape": self.get_obs_size(),
                "n_actions": self.get_total_actions(), "n_agents": self.n_agents, "episode_limit": self.episode_limit}

    def reset(self, episode_config={}):
        self.launched = True
        self.episode_config = episode_config
        self._episode_steps = 0
        self.ally_health = np.ones(self.n_agents)
        self.enemy_health = np.full(self.n_enemies, 2.0)
        self.last_action = np.zeros((self.n_agents, self.n_actions))
        return self.get_obs(), self.get_state()

    def get_obs_agent(self, i):
        obs = np.zeros(self.get_obs_size(), np.float32)
        if self.ally_health[i] > 0:
            obs[:4] = 1
            obs[4:4 + 5 * self.n_enemies:5] = self.enemy_health / 2
            obs[-1] = i / self.n_agents
        return obs

    def get_obs(self):
        return [self.get_obs_agent(i) for i in range(self.n_agents)]

    def get_state(self):
        return np.concatenate([np.repeat(self.ally_health, 4), np.repeat(self.enemy_health / 2, 3),
                               self.last_action.reshape(-1)]).astype(np.float32)

    def get_avail_agent_actions(self, i):
        if self.ally_health[i] == 0:
            return [1] + [0] * (self.n_actions - 1)
        return [0, 1, 1, 1, 1, 1] + [int(h > 0) for h in self.enemy_health]

    def get_avail_actions(self):
        return [self.get_avail_agent_actions(i) for i in range(self.n_agents)]

    def step(self, actions):
        actions = [int(a) for a in actions]
        for i, a in enumerate(actions):
            assert self.get_avail_agent_actions(i)[a] == 1, f"Agent {i} cannot perform action {a}"
        self.last_action = np.eye(self.n_actions)[actions]
        before = self.enemy_health.copy()
        for i, a in enumerate(actions):
            if a == 1:
                self.ally_health[i] = 0
            elif a >= 6:
                self.enemy_health[a - 6] = max(0.0, self.enemy_health[a - 6] - 1)
        self._episode_steps += 1
        kills = int(((before > 0) & (self.enemy_health == 0)).sum())
        reward = float((before - self.enemy_health).sum() + 10 * kills)
        info = {"battle_won": False, "dead_allies": int((self.ally_health == 0).sum()),
                "dead_enemies": int((self.enemy_health == 0).sum())}
        terminated = False
        if (self.enemy_health == 0).all():
            terminated, info["battle_won"] = True, True
            reward += 200
        elif (self.ally_health == 0).all():
            terminated = True
        elif self._episode_steps >= self.episode_limit:
            terminated = True
            if self.continuing_episode:
                info["episode_limit"] = True
        return reward / ((12 * self.n_enemies + 200) / 20), terminated, info

    def close(self):
        self.closed = True


class FakeStarCraft2EnvV2(FakeStarCraft2Env):
    """smacv2.env.StarCraft2Env: more options, and the team comes from the capability config."""

    KWARGS = FakeStarCraft2Env.KWARGS | {"obs_own_pos", "obs_starcraft", "conic_fov", "num_fov_actions",
                                         "use_unit_ranges", "min_attack_range", "kill_unit_step_mul",
                                         "fully_observable", "capability_config", "prob_obs_enemy", "action_mask"}

    def __init__(self, map_name="8m", **kwargs):
        super().__init__(map_name, **kwargs)
        cap = kwargs.get("capability_config", {})
        if "team_gen" in cap:  # as the real env: the sizes come from the distribution config
            self.n_agents, self.n_enemies = cap["team_gen"]["n_units"], cap["team_gen"]["n_enemies"]
            self.n_actions = 6 + self.n_enemies


class FakeCapabilityWrapper:
    """smacv2.env.StarCraftCapabilityEnvWrapper."""

    def __init__(self, **kwargs):
        self.distribution_config = kwargs["capability_config"]
        self.rng = np.random.default_rng(0)
        for key, config in self.distribution_config.items():
            if key in ("n_units", "n_enemies"):
                continue
            config["env_key"] = key
            config["n_units"] = self.distribution_config["n_units"]
            config["n_enemies"] = self.distribution_config["n_enemies"]
            assert config["dist_type"] in ("weighted_teams", "surrounded_and_reflect"), config["dist_type"]
        self.env = FakeStarCraft2EnvV2(**kwargs)

    def reset(self):
        team = self.distribution_config["team_gen"]
        units = list(self.rng.choice(team["unit_types"], size=team["n_units"], p=team["weights"]))
        return self.env.reset({"team_gen": {"ally_team": units, "enemy_team": units, "id": 0}})

    def __getattr__(self, name):
        if hasattr(self.env, name):
            return getattr(self.env, name)
        raise AttributeError

    def get_obs(self):
        return self.env.get_obs()

    def get_state(self):
        return self.env.get_state()

    def get_avail_actions(self):
        return self.env.get_avail_actions()

    def get_env_info(self):
        return self.env.get_env_info()

    def step(self, actions):
        return self.env.step(actions)

    def close(self):
        return self.env.close()


def game_dir(tmp_path, maps=("3m.SC2Map", "5m_vs_6m.SC2Map", "32x32_flat.SC2Map")):
    root = tmp_path / "StarCraftII"
    (root / "Versions" / "Base75689").mkdir(parents=True)
    (root / "Maps" / "SMAC_Maps").mkdir(parents=True)
    for m in maps:
        (root / "Maps" / "SMAC_Maps" / m).write_bytes(b"")
    return root


@pytest.fixture
def fake(monkeypatch, tmp_path):
    """Install the stand-in packages and a StarCraft II directory with the maps."""
    for package, env_module in [("smac", {"StarCraft2Env": FakeStarCraft2Env}),
                                ("smacv2", {"StarCraft2Env": FakeStarCraft2EnvV2,
                                            "StarCraftCapabilityEnvWrapper": FakeCapabilityWrapper})]:
        top, sub = types.ModuleType(package), types.ModuleType(f"{package}.env")
        for k, v in env_module.items():
            setattr(sub, k, v)
        top.env = sub
        monkeypatch.setitem(sys.modules, package, top)
        monkeypatch.setitem(sys.modules, f"{package}.env", sub)
    monkeypatch.setenv("SC2PATH", str(game_dir(tmp_path)))
    FakeStarCraft2Env.instances = []
    return FakeStarCraft2Env.instances


def test_smacv1_shapes(fake):
    env = make_env("smacv1", "5m_vs_6m")
    game = fake[-1]
    assert (env.n_agents, env.n_actions, env.episode_limit) == (5, 12, 70)
    assert (env.obs_dim, env.state_dim) == (game.get_obs_size(), game.get_state_size())
    assert env.discrete and not game.launched  # the game starts at the first reset
    obs, state, avail = env.reset(seed=0)
    assert obs.shape == (5, env.obs_dim) and obs.dtype == np.float32
    assert state.shape == (env.state_dim,) and state.dtype == np.float32
    assert avail.shape == (5, 12) and avail.dtype == bool
    np.testing.assert_array_equal(avail[0], [0, 1, 1, 1, 1, 1] + [1] * 6)
    env.close()
    assert game.closed


def test_win_is_terminated_and_won(fake):
    env = make_env("smacv1", "3m")
    env.reset()
    rewards = []
    for target in (0, 1, 2):
        obs, state, avail, r, term, trunc, info = env.step(np.array([6 + target] * 3))
        rewards.append(r)
    assert term and not trunc and info["won"] is True and info["battle_won"] is True
    assert not avail[:, 6:].any()  # every enemy dead: no attack available
    assert rewards[-1] > rewards[0] > 0  # the win bonus


def test_defeat_is_terminated_not_won(fake):
    env = make_env("smacv1", "3m")
    env.reset()
    _, _, avail, _, term, trunc, info = env.step(np.array([1, 2, 2]))  # agent 0 dies
    assert not term and not trunc and info["won"] is False
    np.testing.assert_array_equal(avail[0], [1] + [0] * 8)  # a dead agent can only no-op
    *_, term, trunc, info = env.step(np.array([0, 1, 1]))
    assert term and not trunc and info["won"] is False


def test_time_limit_is_truncated(fake):
    env = make_env("smacv1", "3m")
    assert fake[-1].kwargs["continuing_episode"] is True  # so that the package flags time limits
    for _ in range(2):
        env.reset()
        flags = [env.step(np.array([2, 3, 4]))[4:6] for _ in range(60)]
        assert flags == [(False, False)] * 59 + [(False, True)]


def test_evaluate_counts_wins(fake):
    env = make_env("smacv1", "3m")

    def focus_fire(obs, state, avail):  # the lowest-numbered attack available, else no-op
        first = np.argmax(avail[..., 6:], axis=-1) + 6
        return np.where(avail[..., 6:].any(-1), first, 0)

    out = evaluate(env, focus_fire, episodes=3, n_envs=2)
    assert out["win_rate"] == 1.0 and out["won"] == [True] * 3 and out["lengths"] == [3, 3, 3]

    def stop(obs, state, avail):
        return np.where(avail[..., 1], 1, 0)

    assert evaluate(env, stop, episodes=2)["win_rate"] == 0.0


def test_options_reach_the_package(fake):
    make_env("smacv1", "3m", difficulty="5", obs_last_action=True, seed=7)
    assert fake[-1].kwargs["difficulty"] == "5" and fake[-1].kwargs["seed"] == 7
    with pytest.raises(EnvError, match="bad option.*no_such_option"):
        make_env("smacv1", "3m", no_such_option=1)
    with pytest.raises(EnvError, match="unknown smacv1 map 'not_a_map'"):
        make_env("smacv1", "not_a_map")


def test_smacv2_capability_configs():
    for task in SMACV2_TASKS:
        race, allies, _, enemies = task.split("_")
        cap = smacv2_capability_config(task)
        assert (cap["n_units"], cap["n_enemies"]) == (int(allies), int(enemies))
        team = cap["team_gen"]
        assert team["dist_type"] == "weighted_teams" and team["observe"] is True
        assert sum(team["weights"]) == pytest.approx(1.0) and len(team["weights"]) == len(team["unit_types"]) == 3
        assert cap["start_positions"] == {"dist_type": "surrounded_and_reflect", "p": 0.5, "map_x": 32, "map_y": 32}
    # sc2_gen_<race>.yaml: protoss has no exception types; a terran team is never all medivacs,
    # a zerg team never all banelings; those two have weight 0.1
    assert "exception_unit_types" not in smacv2_capability_config("protoss_5_vs_5")["team_gen"]
    for race, rare in [("terran", "medivac"), ("zerg", "baneling"), ("protoss", "colossus")]:
        team = smacv2_capability_config(f"{race}_5_vs_5")["team_gen"]
        assert dict(zip(team["unit_types"], team["weights"]))[rare] == 0.1
        if race != "protoss":
            assert team["exception_unit_types"] == [rare]
    assert {r: m for r, (m, *_) in SMACV2_RACES.items()} == {
        "protoss": "10gen_protoss", "terran": "10gen_terran", "zerg": "10gen_zerg"}


@pytest.mark.parametrize("task", SMACV2_TASKS)
def test_smacv2_tasks(fake, task):
    race, allies, _, enemies = task.split("_")
    env = make_env("smacv2", task)
    game = fake[-1]
    assert game.map_name == f"10gen_{race}" and game.kwargs["continuing_episode"] is True
    assert game.kwargs["obs_own_pos"] and game.kwargs["use_unit_ranges"] and game.kwargs["min_attack_range"] == 2
    assert (env.n_agents, env.n_actions) == (int(allies), 6 + int(enemies))
    obs, state, avail = env.reset()
    assert obs.shape == (env.n_agents, env.obs_dim) and state.shape == (env.state_dim,)
    assert set(game.episode_config["team_gen"]["ally_team"]) <= set(SMACV2_RACES[race][1])


def test_smacv2_episode(fake):
    env = make_env("smacv2", "terran_5_vs_5")
    assert env.episode_limit == 200
    env.reset()
    *_, term, trunc, info = env.step(np.array([6, 6, 7, 7, 8]))
    assert not term and not trunc and not info["won"]
    for _ in range(199):
        *_, term, trunc, info = env.step(np.array([2] * 5))
    assert trunc and not term and not info["won"]
    # a fresh capability config per env: the package's wrapper writes into it
    assert "env_key" not in smacv2_capability_config("terran_5_vs_5")["team_gen"]


@pytest.mark.parametrize("env_name,package", [("smacv1", "smac"), ("smacv2", "smacv2")])
def test_missing_package(monkeypatch, env_name, package):
    monkeypatch.setitem(sys.modules, package, None)  # makes "import package" fail
    monkeypatch.setitem(sys.modules, f"{package}.env", None)
    task = "3m" if env_name == "smacv1" else "protoss_5_vs_5"
    with pytest.raises(EnvError) as e:
        make_env(env_name, task)
    msg = str(e.value)
    assert "\n" not in msg and f"needs the {package} package" in msg
    for needed in (f"pip install git+https://github.com/oxwhirl/{package}.git", "StarCraft II", "SC2PATH",
                   "SMAC_Maps", "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python"):
        assert needed in msg


def test_broken_import_is_explained(monkeypatch):
    def broken(name, *args, **kwargs):
        raise TypeError("Descriptors cannot be created directly.")

    monkeypatch.setitem(sys.modules, "smac", None)
    monkeypatch.setattr("importlib.import_module", broken)
    with pytest.raises(EnvError, match="importing smac failed .*Descriptors.*PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION"):
        make_env("smacv1", "3m")


def test_protobuf_implementation_is_chosen(fake, monkeypatch):
    monkeypatch.delenv("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", raising=False)
    make_env("smacv1", "3m")
    assert os.environ["PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION"] == "python"


def test_missing_game(fake, monkeypatch, tmp_path):
    empty = tmp_path / "nothing"
    empty.mkdir()
    monkeypatch.setenv("SC2PATH", str(empty))
    with pytest.raises(EnvError, match=f"smacv1 needs StarCraft II, but SC2PATH={empty} has no game") as e:
        make_env("smacv1", "3m")
    assert "pip install git+https://github.com/oxwhirl/smac.git" in str(e.value)
    monkeypatch.delenv("SC2PATH")
    monkeypatch.setenv("HOME", str(empty))
    with pytest.raises(EnvError, match="SC2PATH is not set and .*StarCraftII has no game"):
        make_env("smacv2", "zerg_5_vs_5")


def test_missing_map(fake, monkeypatch, tmp_path):
    monkeypatch.setenv("SC2PATH", str(game_dir(tmp_path / "other", maps=())))
    with pytest.raises(EnvError, match="smacv1 needs the map 3m.SC2Map, which is not in .*SMAC_Maps"):
        make_env("smacv1", "3m")
    with pytest.raises(EnvError, match="smacv2 needs the map 32x32_flat.SC2Map") as e:
        make_env("smacv2", "protoss_5_vs_5")
    assert "https://github.com/oxwhirl/smacv2/releases/tag/maps" in str(e.value)


def _real_game_reason():
    if importlib.util.find_spec("smac") is None:
        return "the smac package is not installed (pip install git+https://github.com/oxwhirl/smac.git)"
    root = os.path.expanduser(os.environ.get("SC2PATH", "~/StarCraftII"))
    if not os.path.isfile(os.path.join(root, "Maps", "SMAC_Maps", "3m.SC2Map")):
        return f"no StarCraft II with the SMAC maps at {root} (set SC2PATH)"
    return None


@pytest.mark.skipif(_real_game_reason() is not None, reason=str(_real_game_reason()))
def test_real_starcraft():
    env = make_env("smacv1", "3m")
    try:
        obs, state, avail = env.reset()
        assert obs.shape == (3, env.obs_dim) and avail.shape == (3, env.n_actions)
        rng = np.random.default_rng(0)
        for _ in range(env.episode_limit):
            acts = [rng.choice(np.flatnonzero(a)) for a in avail]
            obs, state, avail, r, term, trunc, info = env.step(np.array(acts))
            if term or trunc:
                break
        assert term or trunc
    finally:
        env.close()
