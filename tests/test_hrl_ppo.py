"""Unit tests of hrl_ppo_continuous.py with a scripted fake env and a tiny fake LLC (no simulator)."""
import os
import sys

import pytest
import torch
import torch.nn as nn

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_DIR)
sys.path.insert(0, os.path.join(REPO_DIR, "tests", "fake_isaacgym"))

import hrl_ppo_continuous as hrl  # noqa: E402
from fake_vec_task import FakeVecTask  # noqa: E402
from tasks.isaacgym_env import IsaacGymEnv  # noqa: E402

NUM_OBS, TASK_OBS, LATENT = 6, 2, 3


class ScriptedEnv:
    """Env contract with hand-set rewards and finishes, one row per step() call.

    finish[t][i]: env i's episode ends at step t (fail[t][i]: by failure, else by timeout).
    done / terminate / time_outs are sticky until reset_done(), as in tasks/. Observation of env i
    after step t: [t + 1, i, 10 * (t + 1) + i, 1, task_a, task_b] (the last TASK_OBS = task part)."""

    def __init__(self, rewards, finish, fail, amp=None, num_actions=2):
        self.rewards = torch.tensor(rewards, dtype=torch.float32)
        self.finish = torch.tensor(finish, dtype=torch.bool)
        self.fail = torch.tensor(fail, dtype=torch.bool)
        self.amp = None if amp is None else torch.tensor(amp, dtype=torch.float32)
        self.num_envs = self.rewards.shape[1]
        self.num_obs, self.num_actions, self.device = NUM_OBS, num_actions, torch.device("cpu")
        self.t = 0
        self.actions = []
        self.done = torch.zeros(self.num_envs, dtype=torch.bool)
        self.terminate = torch.zeros_like(self.done)
        self.time_outs = torch.zeros_like(self.done)

    def get_task_obs_size(self):
        return TASK_OBS

    def obs(self, step_count):
        env_index = torch.arange(self.num_envs, dtype=torch.float32)
        columns = [torch.full_like(env_index, step_count), env_index, 10 * step_count + env_index,
                   torch.ones_like(env_index), -env_index, env_index + 0.5]
        return torch.stack(columns, dim=-1)

    def reset(self):
        return {"obs": self.obs(0)}

    def step(self, actions):
        self.actions.append(actions.clone())
        t = self.t
        newly = self.finish[t] & ~self.done
        self.terminate |= newly & self.fail[t]
        self.time_outs |= newly & ~self.fail[t]
        self.done |= newly
        self.t += 1
        extras = {"terminate": self.terminate.clone(), "time_outs": self.time_outs.clone()}
        if self.amp is not None:
            extras["amp_obs"] = self.amp[t].unsqueeze(-1)
        return {"obs": self.obs(self.t)}, self.rewards[t], self.done.clone(), extras

    def reset_done(self):
        self.done[:] = False
        self.terminate[:] = False
        self.time_outs[:] = False
        return {"obs": self.obs(self.t)}


class FakeLLC(nn.Module):
    """Tiny LLC with the llc.py interface; records what act() receives."""

    def __init__(self, obs_dim=NUM_OBS - TASK_OBS, latent_dim=LATENT, action_dim=2, has_discriminator=False):
        super().__init__()
        self.obs_dim, self.latent_dim, self.action_dim = obs_dim, latent_dim, action_dim
        self.has_discriminator = has_discriminator
        self.source_format = "native"
        self.net = nn.Linear(obs_dim + latent_dim, action_dim)
        self.requires_grad_(False)
        self.calls = []

    def act(self, llc_obs, z):
        self.calls.append((llc_obs.clone(), z.clone()))
        return torch.clamp(self.net(torch.cat([llc_obs, nn.functional.normalize(z, dim=-1)], dim=-1)), -1.0, 1.0)

    def style_reward(self, amp_obs):
        return amp_obs[:, 0]


# ------------------------------------------------------------------ the hierarchical step
def masking_script():
    # k = 4 inner steps, 3 envs. env 0 never finishes; env 1 times out at inner step 2 (index 1);
    # env 2 fails at inner step 1 (index 0). Rewards after a finish (100) must not count.
    rewards = [[1.0, 1.0, 5.0], [2.0, 3.0, 100.0], [3.0, 100.0, 100.0], [4.0, 100.0, 100.0]]
    finish = [[False, False, True], [False, True, False], [False, False, False], [False, False, False]]
    fail = [[False, False, True], [False, False, False], [False, False, False], [False, False, False]]
    return rewards, finish, fail


def test_rewards_are_averaged_up_to_the_finishing_step_and_flags_aggregated():
    env = ScriptedEnv(*masking_script())
    obs = env.reset()["obs"]
    step = hrl.hierarchical_step(env, FakeLLC(), torch.ones(3, LATENT), obs, llc_steps=4, task_obs_size=TASK_OBS)
    # env 0: (1 + 2 + 3 + 4) / 4; env 1: (1 + 3) / 2 (timeout at step 2); env 2: 5 / 1 (fell at step 1)
    assert step.reward.tolist() == [2.5, 2.0, 5.0]
    assert step.task_reward_sum.tolist() == [10.0, 4.0, 5.0]
    assert step.control_steps.tolist() == [4.0, 2.0, 1.0]
    assert step.done.tolist() == [False, True, True]
    assert step.terminate.tolist() == [False, False, True]
    assert env.t == 4  # all k inner steps ran: finished envs keep simulating until reset_done()


def test_bootstrap_observation_is_the_one_at_the_finishing_step():
    env = ScriptedEnv(*masking_script())
    step = hrl.hierarchical_step(env, FakeLLC(), torch.ones(3, LATENT), env.reset()["obs"], 4, TASK_OBS)
    # obs[:, 0] counts steps: env 0 ran 4, env 1 finished after step 2, env 2 after step 1
    assert step.bootstrap_obs[:, 0].tolist() == [4.0, 2.0, 1.0]
    assert torch.equal(step.bootstrap_obs[1], env.obs(2)[1])
    assert step.obs[:, 0].tolist() == [4.0, 4.0, 4.0]


def test_llc_gets_obs_without_task_tail_and_the_same_unit_z_every_inner_step():
    rewards, finish, fail = masking_script()
    env, llc = ScriptedEnv(rewards, finish, fail), FakeLLC()
    obs = env.reset()["obs"]
    high_action = torch.tensor([[3.0, 0.0, 0.0], [0.5, -0.5, 0.0], [-2.0, 2.0, 0.25]])
    hrl.hierarchical_step(env, llc, high_action, obs, llc_steps=4, task_obs_size=TASK_OBS)
    expected_z = torch.tensor([[1.0, 0.0, 0.0], [0.5, -0.5, 0.0], [-1.0, 1.0, 0.25]])  # clamp to [-1, 1]
    expected_z = expected_z / expected_z.norm(dim=-1, keepdim=True)
    assert len(llc.calls) == 4
    for inner_step, (llc_obs, z) in enumerate(llc.calls):
        assert llc_obs.shape == (3, NUM_OBS - TASK_OBS)
        assert torch.equal(llc_obs, env.obs(inner_step)[:, : NUM_OBS - TASK_OBS])  # fresh obs each step
        assert torch.allclose(z.norm(dim=-1), torch.ones(3))
        assert torch.allclose(z, expected_z)


def test_flat_baseline_sends_the_clamped_action_to_the_env():
    env = ScriptedEnv([[1.0, 2.0]], [[False, True]], [[False, True]])
    action = torch.tensor([[0.5, -3.0], [2.0, 0.1]])
    step = hrl.hierarchical_step(env, None, action, env.reset()["obs"], llc_steps=1, task_obs_size=TASK_OBS)
    assert torch.equal(env.actions[0], torch.tensor([[0.5, -1.0], [1.0, 0.1]]))
    assert step.reward.tolist() == [1.0, 2.0]
    assert step.terminate.tolist() == [False, True]


@pytest.mark.parametrize("weight", [0.1, 0.25])  # 0.1: ASE's default
def test_style_reward_is_mixed_and_masked_like_the_task_reward(weight):
    rewards, finish, fail = masking_script()
    amp = [[10.0, 20.0, 30.0], [10.0, 40.0, 0.0], [10.0, 0.0, 0.0], [10.0, 0.0, 0.0]]
    env = ScriptedEnv(rewards, finish, fail, amp=amp)
    step = hrl.hierarchical_step(env, FakeLLC(has_discriminator=True), torch.ones(3, LATENT), env.reset()["obs"], 4,
                                 TASK_OBS, style_weight=weight)
    task_mean, style_mean = torch.tensor([2.5, 2.0, 5.0]), torch.tensor([10.0, 30.0, 30.0])
    assert torch.allclose(step.reward, (1.0 - weight) * task_mean + weight * style_mean)
    assert torch.allclose(step.style_reward, style_mean)  # what charts/style_reward averages
    assert step.task_reward_sum.tolist() == [10.0, 4.0, 5.0]  # episode returns stay task-only


def test_style_weight_defaults_and_errors():
    args = hrl.Args()
    env_with_amp = ScriptedEnv(*masking_script())
    env_with_amp.get_num_amp_obs = lambda: 1
    env_without_amp = ScriptedEnv(*masking_script())
    assert hrl.resolve_style_reward_weight(args, FakeLLC(has_discriminator=True), env_with_amp) == 0.1
    assert hrl.resolve_style_reward_weight(args, FakeLLC(has_discriminator=False), env_with_amp) == 0.0
    assert hrl.resolve_style_reward_weight(args, FakeLLC(has_discriminator=True), env_without_amp) == 0.0
    assert hrl.resolve_style_reward_weight(args, None, env_with_amp) == 0.0
    with pytest.raises(SystemExit, match="needs an LLC with a discriminator"):
        hrl.resolve_style_reward_weight(hrl.Args(style_reward_weight=0.2), FakeLLC(), env_with_amp)
    with pytest.raises(SystemExit, match="needs AMP observations"):
        hrl.resolve_style_reward_weight(hrl.Args(style_reward_weight=0.2), FakeLLC(has_discriminator=True), env_without_amp)


# ------------------------------------------------------------------ GAE and bootstrapping
class ValueIsFirstObsEntry:
    def get_value(self, obs):
        return obs[:, 0]


def test_timeouts_bootstrap_and_terminations_do_not():
    obs = torch.tensor([[2.0, 0.0], [3.0, 0.0]])
    step = hrl.HighLevelStep(obs, obs, None, None, None, torch.tensor([True, True]), torch.tensor([False, True]))
    assert hrl.bootstrap_value(ValueIsFirstObsEntry(), step).tolist() == [2.0, 0.0]


def test_gae_hand_computed_with_a_timeout_and_a_termination():
    # gamma = lambda = 0.5. Both envs finish at t = 1: env 0 by timeout (bootstrap V(s_terminal) = 2),
    # env 1 by failure (next value 0).
    rewards = torch.tensor([[1.0, 0.0], [1.0, -1.0], [1.0, 2.0]])
    values = torch.tensor([[0.5, 1.0], [0.5, 1.0], [0.5, 1.0]])
    next_values = torch.tensor([[0.5, 1.0], [2.0, 0.0], [0.5, 1.0]])
    dones = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    advantages, returns = hrl.compute_gae(rewards, values, next_values, dones, gamma=0.5, gae_lambda=0.5)
    # env 0: d2 = 1 + .25 - .5 = .75; d1 = 1 + 1 - .5 = 1.5 (boundary); d0 = .75, A0 = .75 + .25 * 1.5
    # env 1: d2 = 2 + .5 - 1 = 1.5; d1 = -1 + 0 - 1 = -2 (boundary); d0 = -.5, A0 = -.5 + .25 * -2
    assert advantages.tolist() == [[1.125, -1.0], [1.5, -2.0], [0.75, 1.5]]
    assert returns.tolist() == [[1.625, 0.0], [2.0, -1.0], [1.25, 2.5]]


def test_gae_equals_a_plain_per_env_loop_exactly():
    generator = torch.Generator().manual_seed(0)
    T, N, gamma, lam = 7, 5, 0.99, 0.95
    rewards, values, next_values = (torch.randn(T, N, generator=generator) for _ in range(3))
    dones = (torch.rand(T, N, generator=generator) < 0.3).float()
    advantages, _ = hrl.compute_gae(rewards, values, next_values, dones, gamma, lam)
    expected = torch.zeros(T, N)
    for i in range(N):
        running = torch.tensor(0.0)
        for t in reversed(range(T)):
            delta = rewards[t, i] + gamma * next_values[t, i] - values[t, i]
            running = delta + gamma * lam * (1.0 - dones[t, i]) * running
            expected[t, i] = running
    assert torch.equal(advantages, expected)


# ------------------------------------------------------------------ training keeps the LLC frozen
def frozen_llc(tmp_path, obs_dim, action_dim):
    """A real LLC as the trainer gets it: built, saved in the native format, loaded (frozen)."""
    from llc import build_llc, load_llc, save_llc

    torch.manual_seed(1)
    path = str(tmp_path / "llc.pt")
    save_llc(path, build_llc(obs_dim, LATENT, action_dim, arch="mlp", hidden=(8,)), {"robot": "fake"})
    return load_llc(path)


def test_rollout_and_update_train_the_policy_and_leave_the_llc_unchanged(tmp_path):
    torch.manual_seed(0)
    env = IsaacGymEnv(FakeVecTask(num_envs=4, max_episode_length=6))
    llc = frozen_llc(tmp_path, obs_dim=6, action_dim=3)
    llc_before = {k: v.clone() for k, v in llc.state_dict().items()}
    agent = hrl.Agent(env.num_obs, LATENT, hidden_sizes=(16, 16))
    agent_before = {k: v.clone() for k, v in agent.state_dict().items()}
    args = hrl.Args(update_epochs=2, learning_rate=1e-2)
    optimizer = hrl.make_optimizer(agent, args)
    # the LLC's parameters are in no parameter group of the trainer's optimiser
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in llc.parameters()}
    assert not any(p.requires_grad for p in llc.parameters())
    T, k = 5, 2
    storage = hrl.RolloutStorage.allocate(T, 4, env.num_obs, LATENT, "cpu")
    hrl.rollout(env, llc, agent, env.reset()["obs"], storage, k, env.get_task_obs_size(), 0.0, hrl.EpisodeStats(4, "cpu"))
    assert env.vec_task.steps_taken == T * k
    assert storage.dones.sum() > 0  # episodes of 6 steps ended inside the rollout
    advantages, returns = hrl.compute_gae(storage.rewards, storage.values, storage.next_values, storage.dones, 0.99, 0.95)
    metrics = hrl.update_policy(agent, optimizer, storage, advantages, returns, args, minibatch_size=10)
    assert all(torch.isfinite(v) for v in metrics.values())
    for key, value in llc.state_dict().items():
        assert torch.equal(value, llc_before[key]), key
    assert all(p.grad is None for p in llc.parameters())
    assert not torch.equal(agent.state_dict()["actor_mean.0.weight"], agent_before["actor_mean.0.weight"])
    assert not torch.equal(agent.state_dict()["critic.0.weight"], agent_before["critic.0.weight"])
    assert torch.equal(agent.actor_logstd, agent_before["actor_logstd"])  # fixed log-std (ASE)
    assert agent.value_normalizer.count > 1.0


def test_a_trainable_llc_in_the_hierarchical_step_gets_no_gradient():
    """Even an LLC whose parameters require gradients is run without autograd: no update can reach it."""
    llc = FakeLLC()
    llc.requires_grad_(True)
    env = ScriptedEnv(*masking_script())
    high_action = torch.ones(3, LATENT, requires_grad=True)
    hrl.hierarchical_step(env, llc, high_action, env.reset()["obs"], 4, TASK_OBS)
    assert not any(actions.requires_grad for actions in env.actions)


# ------------------------------------------------------------------ networks and normalisers
def test_agent_mean_is_tanh_bounded_and_log_std_fixed_unless_learned():
    agent = hrl.Agent(5, 3, hidden_sizes=(8,))
    obs = 100.0 * torch.randn(7, 5)
    action, logprob, entropy, value, mean = agent.get_action_and_value(obs)
    assert mean.abs().max() <= 1.0 and action.shape == (7, 3) and value.shape == (7,)
    assert not agent.actor_logstd.requires_grad and torch.allclose(agent.actor_logstd, torch.full((1, 3), -2.3))
    assert hrl.Agent(5, 3, hidden_sizes=(8,), learned_log_std=True).actor_logstd.requires_grad
    assert hrl.bounds_loss(torch.tensor([[1.5, -2.0, 0.3]])).item() == pytest.approx(0.25 + 1.0)


def test_episode_stats_sum_finished_episodes_only():
    stats = hrl.EpisodeStats(2, "cpu")
    make = lambda rew, steps, done: hrl.HighLevelStep(None, None, None, torch.tensor(rew), torch.tensor(steps),
                                                      torch.tensor(done), None)
    stats.update(make([1.0, 2.0], [5.0, 5.0], [False, False]))
    stats.update(make([3.0, 4.0], [5.0, 2.0], [False, True]))
    stats.update(make([5.0, 6.0], [5.0, 5.0], [True, False]))
    assert stats.take().tolist() == [9.0 + 6.0, 15.0 + 7.0, 2.0]
    assert stats.take().tolist() == [0.0, 0.0, 0.0]
    assert stats.running_return.tolist() == [0.0, 6.0]


# ------------------------------------------------------------------ Isaac Gym adapter
class ScriptedVecTask:
    """IsaacGymEnvs-style returns: (obs_dict, reward, reset_buf, extras with time_outs)."""

    def __init__(self, resets, time_outs):
        self.resets, self.time_outs, self.t = resets, time_outs, 0
        self.num_envs, self.num_obs, self.num_actions, self.rl_device = 3, 4, 2, "cpu"

    def reset(self):
        return {"obs": torch.zeros(3, 4)}

    def step(self, actions):
        reset, time_out = torch.tensor(self.resets[self.t]), torch.tensor(self.time_outs[self.t])
        self.t += 1
        return {"obs": torch.full((3, 4), float(self.t))}, torch.ones(3), reset.long(), {"time_outs": time_out}


def test_isaacgym_adapter_maps_reset_buf_and_time_outs_onto_the_contract():
    env = IsaacGymEnv(ScriptedVecTask(resets=[[1, 1, 0], [0, 0, 1], [0, 0, 0]],
                                          time_outs=[[True, False, False], [False, False, False], [False, False, False]]))
    assert env.get_task_obs_size() == 0  # IsaacGymEnvs tasks have no task tail
    env.reset()
    _, _, done, extras = env.step(torch.zeros(3, 2))
    assert done.tolist() == [True, True, False]
    assert extras["time_outs"].tolist() == [True, False, False]
    assert extras["terminate"].tolist() == [False, True, False]  # reset and not a timeout
    _, _, done, extras = env.step(torch.zeros(3, 2))
    assert done.tolist() == [True, True, True]  # sticky until reset_done()
    assert extras["terminate"].tolist() == [False, True, True]
    env.reset_done()
    _, _, done, extras = env.step(torch.zeros(3, 2))
    assert done.tolist() == [False, False, False] and not extras["terminate"].any()


# ------------------------------------------------------------------ flags and checkpoints
def test_heading_speed_range_reaches_the_task_and_the_default_is_the_robots():
    args = hrl.parse_args(["--no-cuda", "--env-backend", "mujoco", "--llc-checkpoint", "none",
                           "--heading-speed-range", "2", "3"])
    env = hrl.make_env(args, hrl.derive(args), num_envs=2, seed=0)
    assert env.task_params["speed_range"] == (2.0, 3.0)
    env.reset()
    target_speed = env.task_state["target_speed"]  # m/s, drawn at the reset
    assert bool(((target_speed >= 2.0) & (target_speed < 3.0)).all())
    args = hrl.parse_args(["--no-cuda", "--env-backend", "mujoco", "--llc-checkpoint", "none"])
    assert hrl.make_env(args, hrl.derive(args), num_envs=1, seed=0).task_params["speed_range"] == (0.4, 0.8)  # tasks/ant.py


@pytest.mark.parametrize("argv, message", [
    (["--gamma", "1.5"], "--gamma 1.5: expected a number in \\[0, 1\\]"),
    (["--gae-lambda", "2"], "--gae-lambda 2.0: expected a number in \\[0, 1\\]"),
    (["--clip-coef", "-1"], "--clip-coef -1.0: expected a finite number > 0"),
    (["--learning-rate", "0"], "--learning-rate 0.0: expected a finite number > 0"),
    (["--learning-rate", "-1e-4"], "--learning-rate -0.0001: expected a finite number > 0"),
    (["--learning-rate", "nan"], "--learning-rate nan: expected a finite number > 0"),
    (["--vf-coef", "-5"], "--vf-coef -5.0: expected a finite number >= 0"),
    (["--hidden-sizes", "0", "64"], "--hidden-sizes 0 64: expected one or more integers >= 1"),
    (["--max-grad-norm", "-1"], "--max-grad-norm -1.0: expected a finite number > 0"),
    (["--init-log-std", "nan"], "--init-log-std nan: expected a finite number"),
    (["--target-kl", "0"], "--target-kl 0.0: expected a finite number > 0"),
    (["--torch-threads", "-2"], "--torch-threads -2: expected an integer >= 0"),
    (["--heading-speed-range", "1", "0.5"], r"--heading-speed-range 1.0 0.5: expected 0 <= LO <= HI \(m/s\)"),
    (["--heading-speed-range", "0", "inf"], r"--heading-speed-range 0.0 inf: expected 0 <= LO <= HI"),
    (["--task", "location", "--heading-speed-range", "1", "2"], "--heading-speed-range is for --task heading"),
])
def test_out_of_range_flags_name_the_value_and_what_is_allowed(argv, message):
    with pytest.raises(SystemExit, match=message):
        hrl.parse_args(argv)


def test_a_minibatch_of_one_transition_is_refused():
    with pytest.raises(SystemExit, match="a minibatch of 1 transition .* no advantage spread"):
        hrl.derive(hrl.parse_args(["--num-envs", "2", "--num-steps", "2", "--num-minibatches", "4"]))


@pytest.mark.parametrize("argv, message", [
    (["--resume", "a.pt", "--eval-checkpoint", "b.pt"], "exclude each other"),
    (["--llc-checkpoint", "none", "--llc-steps", "5"], "--llc-steps must be 1, got 5"),
    (["--llc-checkpoint", "none", "--style-reward-weight", "0.1"], "needs an LLC with a discriminator"),
    (["--env-backend", "isaacgym", "--capture-video"], "--capture-video is supported with the tasks/ backends"),
    (["--env-factory", "mod:fn"], "--env-factory mod:fn is for --env-backend isaacgym"),
    (["--env-backend", "isaacgym"], "must be given on the command line"),
    (["--llc-steps", "0"], "--llc-steps 0: expected an integer >= 1"),
    (["--sim-threads", "0"], "--sim-threads 0: expected an integer >= 1"),
    (["--robot", "spider"], "--robot spider --task heading: expected a robot in"),
    (["--style-reward-weight", "1.5"], "--style-reward-weight 1.5: expected a number in \\[0, 1\\]"),
    (["--local-root-obs"], "--local-root-obs is for --robot humanoid on the tasks/ backends \\(got --robot ant"),
    (["--eval-checkpoint", "/nonexistent/ckpt.pt"], "checkpoint /nonexistent/ckpt.pt does not exist"),
])
def test_conflicting_flags_fail_before_anything_is_built(argv, message):
    with pytest.raises(SystemExit, match=message):
        hrl.parse_args(argv)


def test_derived_values():
    derived = hrl.derive(hrl.parse_args(["--no-cuda", "--num-envs", "8", "--total-timesteps", "5000"]))
    assert derived.llc_steps == 5 and not derived.flat and derived.llc_path.endswith(os.path.join("checkpoints", "llc_ant.pt"))
    assert derived.batch_size == 8 * 32 and derived.minibatch_size == 32
    assert derived.sim_steps_per_iteration == 8 * 32 * 5 and derived.num_iterations == 3  # 5000 // 1280
    flat = hrl.derive(hrl.parse_args(["--no-cuda", "--llc-checkpoint", "none"]))
    assert flat.flat and flat.llc_steps == 1 and flat.llc_path is None and flat.num_envs == 64
    with pytest.raises(SystemExit, match="not divisible by --num-minibatches 7"):
        hrl.derive(hrl.parse_args(["--no-cuda", "--num-envs", "4", "--num-minibatches", "7"]))


def test_checkpoint_round_trip_is_weights_only_and_restores_rng(tmp_path):
    agent = hrl.Agent(5, 3, hidden_sizes=(8,))
    agent.obs_normalizer.update(torch.randn(10, 5))
    optimizer = torch.optim.Adam([p for p in agent.parameters() if p.requires_grad])
    args = hrl.Args(num_envs=4, llc_steps=5, total_timesteps=1000)
    path = str(tmp_path / "checkpoint.pt")
    torch.manual_seed(3)
    hrl.save_checkpoint(path, agent, optimizer, args, "run", global_step=640, iteration=2)
    expected_draw = torch.rand(3)
    assert not os.path.exists(path + ".tmp")
    checkpoint = hrl.load_checkpoint(path)  # torch.load(weights_only=True)
    assert checkpoint["global_step"] == 640 and checkpoint["iteration"] == 2 and checkpoint["run_name"] == "run"
    restored = hrl.Agent(5, 3, hidden_sizes=(8,))
    restored.load_state_dict(checkpoint["agent"])
    assert torch.equal(restored.obs_normalizer.running_mean, agent.obs_normalizer.running_mean)
    assert hrl.args_from_checkpoint(checkpoint) == args
    hrl.set_rng_states(checkpoint["rng"])
    assert torch.equal(torch.rand(3), expected_draw)


def test_a_file_from_elsewhere_is_rejected(tmp_path):
    path = str(tmp_path / "other.pt")
    torch.save({"model": {}}, path)
    with pytest.raises(SystemExit, match="not a checkpoint written by hrl_ppo_continuous.py"):
        hrl.load_checkpoint(path)


def test_truncated_and_random_checkpoints_are_clear_errors(tmp_path):
    whole = tmp_path / "whole.pt"
    torch.save({"format": "hrl_ppo_checkpoint", "agent": {"w": torch.zeros(1000)}}, str(whole))
    truncated, random_bytes = tmp_path / "truncated.pt", tmp_path / "random.pt"
    truncated.write_bytes(whole.read_bytes()[:500])
    generator = torch.Generator().manual_seed(0)
    random_bytes.write_bytes(bytes(torch.randint(0, 256, (4096,), generator=generator, dtype=torch.uint8).tolist()))
    for path in (truncated, random_bytes):
        with pytest.raises(SystemExit, match=f"error: checkpoint {path}: not a .*torch checkpoint"):
            hrl.load_checkpoint(str(path))


def test_video_proxy_captures_every_control_step():
    from tasks.video import RecordingEnv

    class CountingRecorder:
        frames = 0

        def capture(self):
            self.frames += 1

    env, recorder = ScriptedEnv(*masking_script()), CountingRecorder()
    recording_env = RecordingEnv(env, recorder)
    assert recording_env.get_task_obs_size() == TASK_OBS  # everything else passes through
    hrl.hierarchical_step(recording_env, FakeLLC(), torch.ones(3, LATENT), env.reset()["obs"], 4, TASK_OBS)
    assert recorder.frames == 4


def test_rewards_after_the_finish_cannot_leak_even_when_not_finite():
    rewards, finish, fail = masking_script()
    rewards[2][1] = float("nan")  # env 1 finished at inner step 2; its later rewards are ignored
    env = ScriptedEnv(rewards, finish, fail)
    step = hrl.hierarchical_step(env, FakeLLC(), torch.ones(3, LATENT), env.reset()["obs"], 4, TASK_OBS)
    assert step.reward.tolist() == [2.5, 2.0, 5.0]


class ScriptedASETask:
    """ASE-style VecTask: obs as a tensor, extras["terminate"], and reset(env_ids) by the caller."""

    def __init__(self):
        self.num_envs, self.num_obs, self.num_actions, self.rl_device = 3, 4, 2, "cpu"
        self.reset_calls = []

    def reset(self, env_ids=None):
        self.reset_calls.append(None if env_ids is None else env_ids.tolist())
        return torch.zeros(3, 4)

    def step(self, actions):
        reset = torch.tensor([1, 1, 0])  # env 0 timed out, env 1 fell
        return torch.ones(3, 4), torch.ones(3), reset, {"terminate": torch.tensor([False, True, False])}


def test_isaacgym_adapter_with_an_ase_style_task_resets_finished_envs_by_id():
    task = ScriptedASETask()
    env = IsaacGymEnv(task)
    assert torch.equal(env.reset()["obs"], torch.zeros(3, 4))
    obs_dict, _, done, extras = env.step(torch.zeros(3, 2))
    assert torch.equal(obs_dict["obs"], torch.ones(3, 4))
    assert done.tolist() == [True, True, False]
    assert extras["terminate"].tolist() == [False, True, False]
    assert extras["time_outs"].tolist() == [True, False, False]
    env.reset_done()
    assert task.reset_calls == [None, [0, 1]]


def test_subnormals_are_flushed_on_cpu_only():
    from hrl_ppo_continuous import flush_denormals_on_cpu

    subnormal = torch.tensor([1e-40], dtype=torch.float32)
    try:
        assert flush_denormals_on_cpu(torch.device("cpu"))
        assert (subnormal * 1.0).item() == 0.0  # read as zero
    finally:
        torch.set_flush_denormal(False)
    assert (subnormal * 1.0).item() != 0.0
    assert not flush_denormals_on_cpu(torch.device("meta"))


# ------------------------------------------------------------------ numerical faults
def tiny_update_batch(agent, n=8, bad_advantage=False):
    generator = torch.Generator().manual_seed(0)
    obs = torch.randn(n, 5, generator=generator)
    with torch.no_grad():
        actions, logprobs, _, values, _ = agent.get_action_and_value(obs)
    advantages = torch.randn(n, generator=generator)
    if bad_advantage:
        advantages[3] = float("nan")
    storage = hrl.RolloutStorage(obs[None], actions[None], logprobs[None], torch.zeros(1, n), torch.zeros(1, n),
                                 values[None], torch.zeros(1, n), torch.zeros(1, n))
    return storage, advantages[None], (values + advantages)[None]


def test_a_non_finite_loss_skips_the_step_and_leaves_parameters_and_adam_state_untouched():
    torch.manual_seed(0)
    agent = hrl.Agent(5, 3, hidden_sizes=(8,), normalize_value=False)
    args = hrl.Args(update_epochs=1, num_minibatches=2)
    optimizer = hrl.make_optimizer(agent, args)
    hrl.update_policy(agent, optimizer, *tiny_update_batch(agent), args, minibatch_size=4)  # Adam has state now
    guard = hrl.NonfiniteGuard(max_in_a_row=10)
    # one minibatch holds the NaN advantage (advantages are normalised per minibatch): exactly one step is skipped
    metrics = hrl.update_policy(agent, optimizer, *tiny_update_batch(agent, bad_advantage=True), args, 4, guard)
    assert guard.skipped == 1 and metrics["losses/nonfinite_updates"].item() == 1.0
    assert all(torch.isfinite(p).all() for p in agent.parameters())
    # all steps skipped: nothing changes
    args_all_bad = hrl.Args(update_epochs=1, num_minibatches=1)
    params_before = {k: v.clone() for k, v in agent.state_dict().items() if "normalizer" not in k}
    adam_before = [{k: v.clone() for k, v in state.items()} for state in optimizer.state.values()]
    hrl.update_policy(agent, optimizer, *tiny_update_batch(agent, bad_advantage=True), args_all_bad, 8, guard)
    for key, value in params_before.items():
        assert torch.equal(agent.state_dict()[key], value), key
    for state, before in zip(optimizer.state.values(), adam_before):
        assert all(torch.equal(state[k], v) for k, v in before.items())


def test_too_many_non_finite_steps_in_a_row_stop_training():
    agent = hrl.Agent(5, 3, hidden_sizes=(8,), normalize_value=False)
    args = hrl.Args(update_epochs=3, num_minibatches=1)
    guard = hrl.NonfiniteGuard(max_in_a_row=3)
    with pytest.raises(hrl.NonfiniteUpdatesError, match="3 optimiser steps in a row"):
        hrl.update_policy(agent, hrl.make_optimizer(agent, args), *tiny_update_batch(agent, bad_advantage=True), args,
                          8, guard)


def test_isaacgym_adapter_fails_and_resets_envs_with_non_finite_rewards_or_observations():
    class NaNTask(ScriptedASETask):
        def step(self, actions):
            obs = torch.ones(3, 4)
            obs[2, 1] = float("inf")
            return obs, torch.tensor([1.0, float("nan"), 1.0]), torch.tensor([0, 0, 0]), {
                "terminate": torch.tensor([False, False, False])}

    task = NaNTask()
    env = IsaacGymEnv(task)
    env.reset()
    obs_dict, reward, done, extras = env.step(torch.zeros(3, 2))
    assert reward.tolist() == [1.0, 0.0, 0.0] and torch.isfinite(obs_dict["obs"]).all()
    assert done.tolist() == [False, True, True] and extras["terminate"].tolist() == [False, True, True]
    assert int(env.nonfinite_resets) == 2
    env.reset_done()
    assert task.reset_calls == [None, [1, 2]]


def malformed_checkpoints(tmp_path):
    """A real checkpoint, then copies with a changed tensor shape, renamed keys, missing entries and a
    wrong flag type: each must be the project's error naming the file."""
    agent = hrl.Agent(5, 3, hidden_sizes=(8,))
    optimizer = hrl.make_optimizer(agent, hrl.Args())
    good = str(tmp_path / "good.pt")
    hrl.save_checkpoint(good, agent, optimizer, hrl.Args(hidden_sizes=(8,)), "run", 0, 1)
    base = torch.load(good, weights_only=True)
    variants = {
        "shape": lambda c: c["agent"].__setitem__("critic.0.weight", torch.zeros(9, 5)),
        "renamed": lambda c: c.__setitem__("agent", {f"x.{k}": v for k, v in c["agent"].items()}),
        "no_rng": lambda c: c.pop("rng"),
        "no_optimizer": lambda c: c.pop("optimizer"),
        "bad_rng": lambda c: c["rng"].pop("torch"),
        "hidden_type": lambda c: c["args"].__setitem__("hidden_sizes", "large"),
    }
    for name, change in variants.items():
        checkpoint = {**base, "agent": dict(base["agent"]), "args": dict(base["args"]), "rng": dict(base["rng"])}
        change(checkpoint)
        torch.save(checkpoint, str(tmp_path / f"{name}.pt"))
    return agent, optimizer, list(variants)


def test_malformed_checkpoints_are_errors_naming_the_file_not_tracebacks(tmp_path):
    agent, optimizer, names = malformed_checkpoints(tmp_path)
    for name in names:
        path = str(tmp_path / f"{name}.pt")
        with pytest.raises(SystemExit, match=f"error: .*{name}") as raised:
            checkpoint = hrl.load_checkpoint(path)
            hrl.args_from_checkpoint(checkpoint, path)
            hrl.restore_training_state(checkpoint, path, agent, optimizer)
        assert path in str(raised.value) and "Traceback" not in str(raised.value), (name, raised.value)
    with pytest.raises(SystemExit, match="is a directory"):
        hrl.load_checkpoint(str(tmp_path))
