"""MADTKD: offline multi-agent RL as sequence modelling, with knowledge distillation.

Docs: docs/baselines.md#madtkd (objective, architecture, the choices the paper leaves open).
Paper: W.-C. Tseng, T.-H. Wang, Y.-C. Lin, P. Isola, "Offline Multi-Agent Reinforcement Learning
with Knowledge Distillation", NeurIPS 2022.
Reference code: none public; the decision-transformer conventions follow Chen et al., "Decision
Transformer: Reinforcement Learning via Sequence Modeling", NeurIPS 2021.

Two causal transformers over return-to-go / observation / action histories. The *teacher* is
trained on the joint data as if one agent produced it: at every time step it reads the team's
return-to-go, all agents' observations and (from earlier steps) all agents' actions, and predicts
every agent's action (Eq. K1). The *students* (one per agent; shared weights plus an agent-id
embedding, one batched forward pass) each read only their own agent's history, and are trained to
match the data's actions, the teacher's action distribution, the teacher's features for that agent,
and the teacher's structural relations between the agents' features (Eq. K2). At evaluation each
student conditions on a target return, lowered by the rewards received (Eq. K3).

    python baselines/madtkd.py --env bridge --task hard --quality mix --total-steps 20000
    python baselines/madtkd.py --env smacv1 --task 5m_vs_6m --quality medium --dataset PATH
    python baselines/madtkd.py --env mamujoco --task Hopper-3x1 --quality medium
"""

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

from common import friendly_errors
from common.runs import Run, eval_only, load_checkpoint, restore_args

ALGO = "madtkd"


@dataclass
class Args:
    # ------------------------------------------- shared fields (docs/architecture.md, the contract)
    env: str = "smacv1"
    """environment family: matrix, bridge, mamujoco, rware, smacv1, smacv2"""
    task: str = "5m_vs_6m"
    """task of the family (e.g. hard, penalty_xor, Hopper-3x1, protoss_5_vs_5)"""
    quality: str = "medium"
    """dataset quality in the catalog (e.g. mix, optimal, medium, expert)"""
    dataset: str = ""
    """path of a dataset (native directory or a public format) instead of the catalog's"""
    seed: int = 0
    """random seed (networks, sampling; evaluation episodes start at 1e6 * (seed + 1))"""
    device: str = "auto"
    """torch device: auto (CUDA when present), cpu, cuda, cuda:1, ..."""
    threads: int = 0
    """CPU threads (0: $OMP_NUM_THREADS if set, else the fastest count, measured while training)"""
    precision: str = "fp32"
    """fp32, or bf16: the update's matmuls in bfloat16 under autocast (weights and optimiser stay fp32)"""
    compile: bool = False
    """torch.compile the update step (compiling takes a while first; see docs/architecture.md)"""
    total_steps: int = 100_000
    """gradient updates"""
    batch_size: int = 64
    """transitions (sequences for sequence models) per update"""
    eval_every: int = 5000
    """updates between evaluations (and at the last update); a checkpoint is written at each"""
    eval_episodes: int = 10
    """episodes per evaluation; 0 turns evaluation off (no environment is built)"""
    final_eval_episodes: int = 100
    """episodes of the final evaluation (metrics.json absolute_metrics)"""
    eval_sample: bool = False
    """evaluate by sampling actions from the policy instead of its greedy (argmax / mean) action"""
    eval_episode_limit: int = 0
    """evaluation episode limit (0: matrix 100, bridge 20, else the dataset's)"""
    eval_envs: int = 10
    """environments stepped side by side during evaluation (one batched forward pass)"""
    log_every: int = 500
    """updates between TensorBoard scalars (the only host synchronisations of the loop)"""
    track: bool = False
    """log to Weights & Biases as well (pip install 'offline-marl[track]'; the TensorBoard scalars are synced)"""
    wandb_project: str = "offline-marl"
    """Weights & Biases project of --track"""
    capture_video: bool = False
    """record one episode of every evaluation as an mp4 under <run>/videos (MaMuJoCo)"""
    resume: bool = False
    """continue the run in --run-dir (default: the newest of this env/task/quality/seed) from its checkpoint"""
    overwrite: bool = False
    """replace the run in --run-dir (only files this project wrote are removed)"""
    run_dir: str = ""
    """run directory (default: runs/<env>__<task>__<quality>__<algo>__<seed>__<time>)"""
    eval_only: bool = False
    """evaluate --checkpoint and print one JSON line"""
    checkpoint: str = ""
    """checkpoint file or run directory for --eval-only"""
    # ---- MADTKD
    teacher_steps: int | None = None
    """updates of the teacher before distillation starts; None: half of --total-steps"""
    context_len: int = 20
    """time steps of history each transformer sees (decision transformer's K)"""
    embed_dim: int = 64
    """token width"""
    n_layers: int = 2
    """transformer blocks"""
    n_heads: int = 2
    """attention heads"""
    dropout: float = 0.1
    """dropout in the transformer blocks and on the token embeddings"""
    lr: float = 1e-4
    """AdamW learning rate of teacher and students (decision transformer: 1e-4)"""
    weight_decay: float = 1e-4
    """AdamW weight decay (decision transformer: 1e-4)"""
    warmup_steps: int = 1000
    """linear learning-rate warm-up at the start of each phase (decision transformer: 10^4)"""
    grad_clip: float = 0.25
    """gradient-norm clip (decision transformer: 0.25)"""
    bc_coef: float = 1.0
    """students: weight of the behaviour-cloning loss on the data's actions"""
    kd_action: float = 1.0
    """students: weight of the action distillation (KL to the teacher's policy / squared distance to its action)"""
    kd_feature: float = 1.0
    """students: weight of the feature distillation (projected student features vs teacher features)"""
    kd_relation: float = 1.0
    """students: weight of the relational distillation (agent-by-agent feature similarities)"""
    rtg_scale: float | None = None
    """returns-to-go are divided by this; None: the largest absolute episode return in the dataset"""
    target_return: float | None = None
    """return the students are conditioned on at evaluation; None: the best episode return in the dataset"""


# ============================================================== pure functions
def time_causal_mask(T: int, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Attention mask of a sequence of T steps laid out as [R_t, o_t^1..o_t^n, a_t^1..a_t^n]:
    ``True`` where attention is *forbidden*. A token sees every token of earlier steps, the
    return-to-go and all observations of its own step, and itself; never a later step and never
    another action of its own step, so the prediction of a_t^i reads no action of step t
    (the teacher, n = N, sees all agents' current observations; a student has n = 1)."""
    per = 1 + 2 * n
    step = torch.arange(T * per, device=device) // per
    kind = torch.arange(T * per, device=device) % per  # 0: R, 1..n: obs, n+1..2n: action
    q_step, k_step = step[:, None], step[None, :]
    visible = (k_step < q_step) | ((k_step == q_step) & (kind[None, :] <= n))
    visible |= torch.eye(T * per, dtype=torch.bool, device=device)
    return ~visible


def relation_matrix(h: torch.Tensor) -> torch.Tensor:
    """The structural relation among agents' features ``h [..., N, d]``: their cosine-similarity
    matrix ``[..., N, N]``."""
    u = F.normalize(h, dim=-1)
    return u @ u.transpose(-1, -2)


def masked_log_softmax(logits: torch.Tensor, avail: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """log pi(a) of the categorical policy softmax(logits) restricted to the available actions, ``[..., K]``.

    ``avail [..., K]`` marks the available actions. ``keep [...]`` (optional, one action index per
    row, e.g. the dataset's) counts as available, so its log-probability is finite even where the
    data marks it unavailable. A row with no available action counts as all-available (a
    distribution, never NaN). The softmax is taken with -inf at the unavailable actions; they then
    get the log-probability -1e4, set after the softmax: probability exactly 0 in any float type,
    gradient exactly 0, and the log-ratio of two such entries exactly 0 (never the difference of
    two large rounded numbers, as a finite fill before the softmax would give)."""
    if keep is not None:
        avail = avail.scatter(-1, keep.unsqueeze(-1), True)
    avail = avail | ~avail.any(-1, keepdim=True)
    logp = logits.masked_fill(~avail, float("-inf")).log_softmax(-1)
    return logp.masked_fill(~avail, -1e4)


def distillation_losses(s_out: torch.Tensor, t_out: torch.Tensor, s_feat: torch.Tensor, t_feat: torch.Tensor,
                        avail: torch.Tensor, mask: torch.Tensor, discrete: bool) -> dict[str, torch.Tensor]:
    """Eq. K2's three distillation terms, averaged over the valid steps ``mask [B, T]``:
    action (discrete: KL(pi_T || pi_S) over the available actions; continuous: squared distance
    between the actions), feature (squared distance between the student's projected features and the
    teacher's), relation (squared distance between the agents' cosine-similarity matrices).
    ``*_out [B, T, N, K|A]``, ``*_feat [B, T, N, d]`` (student features already projected)."""
    m = mask.float()
    n_valid = m.sum().clamp(min=1.0)
    if discrete:
        logp_t, logp_s = masked_log_softmax(t_out, avail), masked_log_softmax(s_out, avail)
        per = (logp_t.exp() * (logp_t - logp_s)).sum(-1).mean(-1)
    else:
        per = ((s_out - t_out) ** 2).sum(-1).mean(-1)
    action = (per * m).sum() / n_valid
    feature = (((s_feat - t_feat) ** 2).mean((-1, -2)) * m).sum() / n_valid
    relation = (((relation_matrix(s_feat) - relation_matrix(t_feat)) ** 2).mean((-1, -2)) * m).sum() / n_valid
    return {"action": action, "feature": feature, "relation": relation}


def bc_loss(out: torch.Tensor, actions: torch.Tensor, avail: torch.Tensor, mask: torch.Tensor,
            discrete: bool) -> torch.Tensor:
    """Eq. K1: the data's actions under the predicted policy (discrete: cross-entropy over the
    available actions; continuous: squared error of the predicted action), mean over valid steps."""
    m = mask.float()
    if discrete:
        logp = masked_log_softmax(out, avail, keep=actions).gather(-1, actions.unsqueeze(-1)).squeeze(-1)
        per = -logp.mean(-1)
    else:
        per = ((out - actions) ** 2).sum(-1).mean(-1)
    return (per * m).sum() / m.sum().clamp(min=1.0)


# =================================================================== networks
class DecisionTransformer(nn.Module):
    """A causal transformer over steps [R_t, o_t^1..o_t^n, a_t^1..a_t^n] (``time_causal_mask``).

    Token embeddings: a linear map of the scaled return-to-go, of each observation, and of each
    action (discrete: an embedding table; continuous: a linear map), plus a learned embedding of the
    episode time step and of the agent (its id). The output at o_t^i is the agent's feature h_t^i
    and a linear head on it predicts a_t^i (logits, or a tanh action)."""

    def __init__(self, obs_dim: int, n_actions: int, act_dim: int, discrete: bool, n_agents: int, max_t: int,
                 embed: int, layers: int, heads: int, dropout: float):
        super().__init__()
        self.discrete, self.max_t = discrete, max_t
        self.emb_rtg = nn.Linear(1, embed)
        self.emb_obs = nn.Linear(obs_dim, embed)
        self.emb_act = nn.Embedding(n_actions, embed) if discrete else nn.Linear(act_dim, embed)
        self.emb_t = nn.Embedding(max_t, embed)
        self.emb_agent = nn.Embedding(n_agents, embed)
        self.ln = nn.LayerNorm(embed)
        self.drop = nn.Dropout(dropout)
        layer = nn.TransformerEncoderLayer(embed, heads, 4 * embed, dropout, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.ln_out = nn.LayerNorm(embed)
        self.head = nn.Linear(embed, n_actions if discrete else act_dim)

    def forward(self, rtg: torch.Tensor, obs: torch.Tensor, act: torch.Tensor, t: torch.Tensor,
                agent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``rtg [B, T]``, ``obs [B, T, n, o]``, ``act [B, T, n(, A)]``, ``t [B, T]`` (long),
        ``agent [B, n]`` (long) -> features ``[B, T, n, d]`` and head outputs ``[B, T, n, K|A]``."""
        B, T, n = obs.shape[:3]
        e_t = self.emb_t(t.clamp(0, self.max_t - 1)).unsqueeze(2)  # [B, T, 1, d]
        e_ag = self.emb_agent(agent).unsqueeze(1)  # [B, 1, n, d]
        tok = torch.cat([self.emb_rtg(rtg.unsqueeze(-1)).unsqueeze(2) + e_t,
                         self.emb_obs(obs) + e_t + e_ag,
                         self.emb_act(act) + e_t + e_ag], dim=2)  # [B, T, 1 + 2n, d]
        x = self.drop(self.ln(tok.reshape(B, T * (1 + 2 * n), -1)))
        x = self.blocks(x, mask=time_causal_mask(T, n, x.device))
        h = self.ln_out(x).reshape(B, T, 1 + 2 * n, -1)[:, :, 1:1 + n]  # outputs at the observation tokens
        out = self.head(h)
        return h, (out if self.discrete else torch.tanh(out))


def run_teacher(model: DecisionTransformer, rtg, obs, act, t):
    """The teacher on joint sequences: one sequence per window, all N agents in it."""
    B, N = obs.shape[0], obs.shape[2]
    return model(rtg, obs, act, t, torch.arange(N, device=obs.device).expand(B, N))


def run_students(model: DecisionTransformer, rtg, obs, act, t):
    """The students: agent i's own history only, as B*N independent sequences with its id; outputs
    are returned as ``[B, T, N, ...]``."""
    B, T, N = obs.shape[:3]

    def split(x):  # [B, T, N, ...] -> [B*N, T, 1, ...]
        return x.transpose(1, 2).reshape(B * N, T, 1, *x.shape[3:])

    ids = torch.arange(N, device=obs.device).repeat(B).unsqueeze(-1)
    h, out = model(rtg.repeat_interleave(N, 0), split(obs), split(act), t.repeat_interleave(N, 0), ids)

    def join(x):
        return x.reshape(B, N, T, *x.shape[3:]).transpose(1, 2)

    return join(h), join(out)


def build_networks(args: Args, dims: dict[str, Any]) -> nn.ModuleDict:
    n, disc = dims["n_agents"], dims["discrete"]
    k, ad, o = dims.get("n_actions", 1), dims.get("act_dim", 1), dims["obs_dim"]
    cfg = (o, k, ad, disc, n, dims["max_t"], args.embed_dim, args.n_layers, args.n_heads, args.dropout)
    return nn.ModuleDict(dict(teacher=DecisionTransformer(*cfg), student=DecisionTransformer(*cfg),
                              project=nn.Linear(args.embed_dim, args.embed_dim)))


class ActFn:
    """Return-conditioned ``act_fn(obs [E,N,o], state [E,S], avail [E,N,K]) -> actions``.

    It keeps the last ``context_len`` steps of every environment: return-to-go, observations and its
    own actions. ``reset(mask)`` starts new episodes at the target return; ``observe_reward(r)``
    (called by ``common.envs.evaluate`` after each step) lowers the return-to-go by the reward
    (Eq. K3). ``centralised=True`` acts with the teacher (it reads every agent's observation)."""

    def __init__(self, model: DecisionTransformer, dims: dict[str, Any], context_len: int, rtg_scale: float,
                 target_return: float, device: torch.device, centralised: bool = False, meta: dict | None = None,
                 sample: bool = False):
        self.model, self.dims, self.K, self.device = model, dims, context_len, device
        self.scale, self.target, self.centralised, self.meta = rtg_scale, target_return, centralised, meta
        self.sample, self.gen = sample, torch.Generator(device)  # reseeded by common.envs.evaluate
        self.E = 0

    def reseed(self, seed: int) -> None:
        self.gen.manual_seed(seed)

    def _alloc(self, E: int) -> None:
        d, K, N = self.dims, self.K, self.dims["n_agents"]
        self.E = E
        self.rtg = torch.zeros(E, K, device=self.device)
        self.obs = torch.zeros(E, K, N, d["obs_dim"], device=self.device)
        self.act = (torch.zeros(E, K, N, dtype=torch.long, device=self.device) if d["discrete"]
                    else torch.zeros(E, K, N, d.get("act_dim", 1), device=self.device))
        self.t = torch.zeros(E, K, dtype=torch.long, device=self.device)
        self.len = torch.zeros(E, dtype=torch.long, device=self.device)  # steps stored (<= K)
        self.ep_t = torch.zeros(E, dtype=torch.long, device=self.device)  # time step in the episode
        self.cur_rtg = torch.full((E,), self.target / self.scale, device=self.device)

    def reset(self, mask) -> None:
        m = torch.as_tensor(np.asarray(mask), dtype=torch.bool, device=self.device)
        if self.E != m.shape[0]:
            self._alloc(m.shape[0])
            return
        self.len[m] = 0
        self.ep_t[m] = 0
        self.cur_rtg[m] = self.target / self.scale

    def observe_reward(self, reward) -> None:
        self.cur_rtg -= torch.as_tensor(np.asarray(reward), dtype=torch.float32, device=self.device) / self.scale

    @torch.no_grad()
    def __call__(self, obs, state, avail):
        obs = torch.as_tensor(obs, dtype=torch.float32, device=self.device)
        av = torch.as_tensor(avail, dtype=torch.bool, device=self.device)
        E = obs.shape[0]
        if self.E != E:
            self._alloc(E)
        full = self.len >= self.K  # shift full histories left by one step
        if full.any():
            for buf in (self.rtg, self.obs, self.act, self.t):
                buf[full] = torch.roll(buf[full], -1, dims=1)
            self.len[full] = self.K - 1
        pos = self.len  # where this step goes
        rows = torch.arange(E, device=self.device)
        self.rtg[rows, pos] = self.cur_rtg
        self.obs[rows, pos] = obs
        self.t[rows, pos] = self.ep_t
        self.act[rows, pos] = 0  # this step's action is not visible to its own prediction (the mask)
        run = run_teacher if self.centralised else run_students
        _, out = run(self.model, self.rtg, self.obs, self.act, self.t)
        out = out[rows, pos]  # [E, N, K|A]
        if not self.dims["discrete"]:
            a = out
        elif self.sample:
            probs = torch.softmax(out.masked_fill(~av, -1e10), -1)
            a = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=self.gen).reshape(probs.shape[:-1])
        else:
            a = out.masked_fill(~av, -1e10).argmax(-1)
        self.act[rows, pos] = a
        self.len += 1
        self.ep_t += 1
        return a.cpu().numpy()


def load_policy(checkpoint: str, device: str = "cpu", sample: bool | None = None) -> ActFn:
    """The students' ``act_fn`` of a saved run, conditioned on the run's target return (stateful:
    ``reset(mask)``, ``observe_reward(r)``; ``sample``: sampled discrete actions, None: as the run
    was evaluated); its ``meta`` attribute is the dataset meta."""
    ck = load_checkpoint(checkpoint, ALGO)
    args = restore_args(Args, ck["args"])
    nets = build_networks(args, ck["dims"]).to(device).eval()
    nets.load_state_dict(ck["modules"]["nets"])
    d = ck["dims"]
    act_fn = ActFn(nets["student"], d, args.context_len, d["rtg_scale"], d["target_return"], torch.device(device),
                   meta=ck["meta"], sample=args.eval_sample if sample is None else sample)
    act_fn.args, act_fn.step = args, ck["step"]
    return act_fn


# ======================================================================= main
def dims_of(dataset) -> dict[str, Any]:
    """The dataset's shapes that size the networks."""
    return dict(n_agents=dataset.n_agents, obs_dim=dataset.obs_dim, state_dim=dataset.state_dim,
                discrete=dataset.discrete, n_actions=dataset.n_actions, act_dim=dataset.act_dim)


def main(args: Args) -> dict[str, Any]:
    if args.eval_only:
        return eval_only(args, ALGO, load_policy)
    teacher_steps = args.total_steps // 2 if args.teacher_steps is None else args.teacher_steps
    run = Run(args, ALGO, positive=("context_len", "warmup_steps"), nonneg=("weight_decay", "bc_coef", "kd_action",
                                                                           "kd_feature", "kd_relation", "rtg_scale"),
              checks=((0 <= teacher_steps <= args.total_steps,
                       f"--teacher-steps must lie in [0, --total-steps], got {teacher_steps}"),))
    data, env = run.load_data()
    device = run.device
    # per-row return-to-go and time step, gathered with the sampler's rows
    returns = data.episode_returns()
    rtg_scale = args.rtg_scale or max(float(np.abs(returns).max()), 1e-6)
    target = float(returns.max()) if args.target_return is None else args.target_return
    es = np.asarray(data.episode_start)
    t_row = np.arange(data.n_rows) - np.repeat(es[:-1], np.diff(es))
    limit = data.meta.get("env_options", {}).get("episode_limit") or data.meta.get("episode_limit") or 0
    max_t = int(max(data.episode_lengths.max(), limit)) + 1  # time embeddings; later steps share the last
    data.to(device).seed(args.seed)
    rtg_all = torch.as_tensor(data.returns_to_go() / rtg_scale, device=device)
    t_all = torch.as_tensor(t_row, device=device)
    dims = {**dims_of(data), "max_t": max_t, "rtg_scale": rtg_scale, "target_return": target}
    disc = dims["discrete"]
    nets = build_networks(args, dims).to(device)
    teacher, student, project = nets["teacher"], nets["student"], nets["project"]
    opt = {"teacher": torch.optim.AdamW(teacher.parameters(), lr=args.lr, weight_decay=args.weight_decay),
           "student": torch.optim.AdamW([*student.parameters(), *project.parameters()], lr=args.lr,
                                        weight_decay=args.weight_decay)}
    K = args.context_len

    def window(b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        rows = b["rows"][:, :K]
        return dict(rtg=rtg_all[rows], obs=b["obs"][:, :K], act=b["actions"], t=t_all[rows], avail=b["avail"][:, :K],
                    mask=b["mask"])

    def step_on(key: str, loss: torch.Tensor, params, phase_step: int) -> None:
        for g in opt[key].param_groups:  # linear warm-up, a function of the step (exact on resume)
            g["lr"] = args.lr * min(1.0, (phase_step + 1) / max(args.warmup_steps, 1))
        opt[key].zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, args.grad_clip)
        opt[key].step()

    def update_teacher(w: dict[str, torch.Tensor], phase_step: int) -> dict[str, torch.Tensor]:
        teacher.train()
        _, out = run_teacher(teacher, w["rtg"], w["obs"], w["act"], w["t"])
        loss = bc_loss(out, w["act"], w["avail"], w["mask"], disc)  # Eq. K1
        step_on("teacher", loss, teacher.parameters(), phase_step)
        return {"losses/teacher": loss.detach()}

    def update_student(w: dict[str, torch.Tensor], phase_step: int) -> dict[str, torch.Tensor]:
        teacher.eval()
        student.train()
        with torch.no_grad():
            t_feat, t_out = run_teacher(teacher, w["rtg"], w["obs"], w["act"], w["t"])
        s_feat, s_out = run_students(student, w["rtg"], w["obs"], w["act"], w["t"])
        bc = bc_loss(s_out, w["act"], w["avail"], w["mask"], disc)
        kd = distillation_losses(s_out, t_out, project(s_feat), t_feat, w["avail"], w["mask"], disc)
        loss = (args.bc_coef * bc + args.kd_action * kd["action"] + args.kd_feature * kd["feature"]
                + args.kd_relation * kd["relation"])  # Eq. K2
        step_on("student", loss, [*student.parameters(), *project.parameters()], phase_step)
        return {"losses/student": loss.detach(), "losses/student_bc": bc.detach(),
                **{f"losses/kd_{k}": v.detach() for k, v in kd.items()}}

    act_fn = ActFn(student, dims, K, rtg_scale, target, device, centralised=False, sample=args.eval_sample)
    run.start(data, env, act_fn, dims=dims, modules={"nets": nets}, optimizers=opt)
    teacher_step, student_step = run.compile(update_teacher), run.compile(update_student)  # --compile
    while run.training:
        with run.autocast():  # bfloat16 matmuls with --precision bf16
            w = window(data.sample_sequences(args.batch_size, K))
            if run.step < teacher_steps:  # phase 1: the centralised teacher; phase 2: the students
                stats = teacher_step(w, run.step)
            else:
                stats = student_step(w, run.step - teacher_steps)
        run.record(stats)
    return run.finish()


if __name__ == "__main__":
    with friendly_errors():
        main(tyro.cli(Args))
