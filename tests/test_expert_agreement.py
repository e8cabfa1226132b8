"""benchmarks/expert_agreement.py: the scripted LBF expert, played as the policy, agrees with itself
at every step (its random tie-breaking included), and a uniform policy rarely does; with the
expert's states the expert's actions are played whatever the policy asks."""

import numpy as np
import pytest

pytest.importorskip("lbforaging")

from _baselines_common import load_file  # noqa: E402
from common.envs import make_env  # noqa: E402
from common.scripted import LBFExpert  # noqa: E402


def load_tool():
    return load_file("benchmarks/expert_agreement.py")


def test_the_expert_agrees_with_itself_and_a_uniform_policy_does_not():
    tool = load_tool()
    env = make_env("lbf", "8x8-2p-2f-coop")
    me, rng = LBFExpert(), np.random.default_rng(1)
    me.reset(env, rng)

    def expert_policy(obs, state, avail):  # the expert itself, with its own tie-breaking
        return np.asarray(me(env, obs[0], state[0], avail[0]))[None]

    res = tool.agreement(expert_policy, env, 5, 100, "own", split=1, draws=64)
    assert res["all"][0] == 1.0 and res["ret"] == pytest.approx(1.0)
    assert res["early"][1] == 2 * 5 and res["early"][1] + res["late"][1] == res["all"][1]  # step 0 of 5 episodes, 2 agents

    uni = np.random.default_rng(2)

    def uniform(obs, state, avail):
        return (uni.random(avail.shape) * avail).argmax(-1)

    own = tool.agreement(uniform, env, 5, 100, "own", split=5)
    assert own["all"][0] < 0.5 and own["ret"] < 1.0
    # the expert's states: its actions are played (it collects all the food), the uniform policy is only asked
    theirs = tool.agreement(uniform, env, 5, 100, "expert", split=5)
    assert theirs["ret"] == pytest.approx(1.0) and theirs["all"][0] < 0.5
    with pytest.raises(ValueError):
        tool.agreement(uniform, env, 1, 100, "both", split=5)

    class ReturnConditioned:  # a decision transformer's act_fn: told every reward, conditions on its own actions
        def __init__(self):
            self.rewards = []

        def __call__(self, obs, state, avail):
            return uniform(obs, state, avail)

        def observe_reward(self, r):
            self.rewards.append(float(r[0]))

    dt = ReturnConditioned()
    mine = tool.agreement(dt, env, 2, 100, "own", split=5)
    assert sum(dt.rewards) == pytest.approx(2 * mine["ret"]) and len(dt.rewards) == mine["all"][1] // 2
    with pytest.raises(ValueError, match="decision transformer"):
        tool.agreement(ReturnConditioned(), env, 1, 100, "expert", split=5)
