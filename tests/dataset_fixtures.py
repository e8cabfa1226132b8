"""Builders of ground-truth episodes and of each public format's raw arrays, shared by
the dataset tests. Each builder restates a source's layout independently of the readers
in ``common/formats.py`` (see docs/datasets.md)."""

import numpy as np

from common.data import OfflineDataset


def make_episodes(E=7, N=3, o=4, S=5, K=4, A=None, seed=0, max_len=6, per_agent_state=False, lengths=None):
    """Random episodes: obs/state/avail have L+1 slots (the last is the final observation)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, max_len + 1, size=E) if lengths is None else np.asarray(lengths)
    eps = []
    for e, L in enumerate(lengths):
        ep = dict(obs=rng.normal(size=(L + 1, N, o)).astype(np.float32),
                  state=rng.normal(size=(L + 1, N, S) if per_agent_state else (L + 1, S)).astype(np.float32),
                  reward=rng.normal(size=L).astype(np.float32), terminated=bool(rng.random() < 0.5))
        ep["obs"][:, :, 0] = e  # episode id, to make mix-ups visible
        if A is None:
            avail = rng.random((L + 1, N, K)) < 0.6
            actions = rng.integers(0, K, size=(L, N))
            avail[np.arange(L)[:, None], np.arange(N)[None], actions] = True
            ep.update(avail=avail, actions=actions)
        else:
            ep["actions"] = rng.uniform(-1, 1, size=(L, N, A)).astype(np.float32)
        eps.append(ep)
    return eps


def expected(eps, *, missing_final=False, time_limit=None, state=None, meta=None):
    """The dataset a reader must produce: time-limit relabelling, and for formats that do
    not store the final observation, the repeat/drop rule of docs/datasets.md."""
    out = []
    for ep in eps:
        ep = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in ep.items()}
        L = len(ep["reward"])
        if time_limit and L == time_limit:
            ep["terminated"] = False
        if missing_final:
            if ep["terminated"]:
                for k in ("obs", "state", "avail"):
                    if k in ep:
                        ep[k][L] = ep[k][L - 1]
            else:
                if L == 1:
                    continue
                for k in ("obs", "state", "avail"):
                    if k in ep:
                        ep[k] = ep[k][:L]
                ep["actions"], ep["reward"] = ep["actions"][: L - 1], ep["reward"][: L - 1]
        if state is not None:
            ep["state"] = state(ep)
        out.append(ep)
    discrete = "avail" in eps[0]
    m = dict(env="e", task="t", discrete=discrete, **(meta or {}))
    if discrete:
        m["n_actions"] = eps[0]["avail"].shape[-1]
    return OfflineDataset.from_episodes(out, m)


def vault_streams(eps, B=1, trailing=0, final_obs_row=False, rng=None):
    """OG-MARL's recording: one row per step (obs, action, reward, flags after the step,
    infos at the obs), no final observation; with ``final_obs_row`` the final observation
    is an extra row carrying the end flag (the OMIGA copies)."""
    rng = rng or np.random.default_rng(1)
    per_b = [eps[b::B] for b in range(B)]
    streams = []
    for b_eps in per_b:
        rows = {k: [] for k in ("observations", "actions", "rewards", "terminals", "truncations", "state", "legals")}
        for ep in b_eps:
            L, N = len(ep["reward"]), ep["obs"].shape[1]
            n_rows = L + 1 if final_obs_row else L
            for t in range(n_rows):
                step = t < L
                rows["observations"].append(ep["obs"][t])
                rows["state"].append(ep["state"][t])
                if "avail" in ep:
                    rows["legals"].append(ep["avail"][t].astype(np.float32))
                rows["actions"].append(ep["actions"][t] if step else np.zeros_like(ep["actions"][0]))
                rows["rewards"].append(np.full(N, ep["reward"][t] if step else 0.0, np.float32))
                end = t == n_rows - 1
                rows["terminals"].append(np.full(N, end and (ep["terminated"] or final_obs_row)))
                rows["truncations"].append(np.full(N, end and not ep["terminated"] and not final_obs_row))
        for _ in range(trailing):  # an episode still running when recording stopped
            for k in rows:
                if rows[k]:
                    rows[k].append(rng.normal(size=np.shape(rows[k][-1])).astype(np.asarray(rows[k][-1]).dtype)
                                   if k not in ("terminals", "truncations") else np.zeros_like(rows[k][-1]))
        streams.append({k: np.stack(v) for k, v in rows.items() if v})
    T = min(len(s["rewards"]) for s in streams)  # one time axis: every stream is cut to the shortest
    stack = {k: np.stack([s[k][:T] for s in streams]) for k in streams[0]}
    experience = {k: stack[k] for k in ("observations", "actions", "rewards", "terminals", "truncations")}
    experience["infos"] = {"state": stack["state"]}
    if "legals" in stack:
        experience["infos"]["legals"] = stack["legals"]
    return experience, T


def pymarl_arrays(eps, T1, *, timeouts_flagged, empty=1):
    """pymarl EpisodeBatch: slot t < L the step, slot L the final obs (+ an extra action),
    filled on slots 0..L; ``timeouts_flagged``: time-limit ends also set terminated
    (AlberDICE's pymarl), else only true ends do (pymarl2 / CFCQL)."""
    E = len(eps) + empty
    N, o = eps[0]["obs"].shape[1:]
    S, K = eps[0]["state"].shape[-1], eps[0]["avail"].shape[-1]
    a = dict(state=np.zeros((E, T1, S), np.float32), obs=np.zeros((E, T1, N, o), np.float32),
             actions=np.zeros((E, T1, N, 1), np.int64), avail_actions=np.zeros((E, T1, N, K), np.int32),
             actions_onehot=np.zeros((E, T1, N, K), np.float32), reward=np.zeros((E, T1, 1), np.float32),
             terminated=np.zeros((E, T1, 1), np.uint8), filled=np.zeros((E, T1, 1), np.int64))
    for e, ep in enumerate(eps):
        L = len(ep["reward"])
        a["state"][e, : L + 1] = ep["state"]
        a["obs"][e, : L + 1] = ep["obs"]
        a["avail_actions"][e, : L + 1] = ep["avail"]
        a["actions"][e, :L, :, 0] = ep["actions"]
        a["actions"][e, L, :, 0] = 1  # the behaviour policy's action at the final state
        a["actions_onehot"][e, np.arange(L + 1)[:, None], np.arange(N)[None], a["actions"][e, : L + 1, :, 0]] = 1
        a["reward"][e, :L, 0] = ep["reward"]
        a["terminated"][e, L - 1, 0] = ep["terminated"] or (timeouts_flagged and L == T1 - 1)
        a["filled"][e, : L + 1] = 1
    return a


def madt_episodes(eps):
    """Per agent a list of [g, o, [a], [r], done, ava] steps; no final observation."""
    out = []
    for ep in eps:
        L, N = len(ep["reward"]), ep["obs"].shape[1]
        out.append([[[ep["state"][t].tolist(), ep["obs"][t, i], [int(ep["actions"][t, i])], [float(ep["reward"][t])],
                      bool(t == L - 1), ep["avail"][t, i].astype(np.float32).tolist()]
                     for t in range(L)] for i in range(N)])
    return out
