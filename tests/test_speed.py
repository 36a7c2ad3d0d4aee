"""The trainer's speed options give the eager results: torch.compile of the LLC and of the PPO minibatch loss,
fused Adam, and (CUDA only, `@pytest.mark.cuda`) the high-level step replayed as one CUDA graph.

Small on purpose (few worlds, few steps, small networks): compiling takes 10-30 s per function on a
2-core CPU. The CUDA tests skip without a GPU; on a GPU machine `python -m pytest tests/test_speed.py -m cuda`
runs only them."""

import os
import sys
from dataclasses import replace

import pytest
import torch

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_DIR)

import hrl_ppo_continuous as hrl  # noqa: E402
from llc import build_llc  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
HIGH_LEVEL_STEPS, LLC_STEPS = 3, 5


def small_llc(env, device="cpu", seed=0):
    """An untrained LLC with small layers, frozen, for env (its obs without the task part -> its joint actions)."""
    torch.manual_seed(seed)
    llc = build_llc(env.num_obs - env.get_task_obs_size(), 4, env.num_actions, hidden=(32, 16), style_hidden=(16,),
                    style_dim=8)
    return llc.to(device).freeze()


def latents(env, steps, seed=1):
    generator = torch.Generator(env.device).manual_seed(seed)
    return [torch.randn(env.num_envs, 4, generator=generator, device=env.device) for _ in range(steps)]


def run_high_level_steps(env, step_fn, actions):
    """From a reset with seed 11: step_fn(action, obs) per action, reset_done() between; the results, copied."""
    env.seed(11)
    obs = env.reset()["obs"]
    results = []
    for action in actions:
        result = step_fn(action, obs)
        results.append(hrl.HighLevelStep(*(None if value is None else value.clone() for value in result)))
        obs = env.reset_done()["obs"]
    return results


def assert_same_steps(got, expected, atol):
    assert len(got) == len(expected)
    for step, (a, b) in enumerate(zip(got, expected)):
        for name, value, reference in zip(hrl.HighLevelStep._fields, a, b):
            if reference is None:
                assert value is None, f"step {step}: {name}"
            elif reference.dtype == torch.bool:
                assert torch.equal(value, reference), f"step {step}: {name}"
            else:
                torch.testing.assert_close(value, reference, rtol=0, atol=atol, msg=f"step {step}: {name}")


# ---------------------------------------------------------------- CPU: torch.compile
def test_compiled_llc_gives_the_eager_hierarchical_steps(make_test_env):
    env = make_test_env("ant", "heading", tag="speed")
    eager_llc, compiled_llc = small_llc(env), hrl.compile_llc(small_llc(env))
    assert hasattr(compiled_llc.act, "_torchdynamo_orig_callable")  # torch.compile's wrapper, not the method
    actions = latents(env, HIGH_LEVEL_STEPS)

    def stepper(llc):
        return hrl.make_high_level_step(env, llc, LLC_STEPS, env.get_task_obs_size(), 0.0, 4, cuda_graph=False)

    eager = run_high_level_steps(env, stepper(eager_llc), actions)
    compiled = run_high_level_steps(env, stepper(compiled_llc), actions)
    assert any(step.reward.abs().sum() > 0 for step in eager)  # the env did move and reward
    assert_same_steps(compiled, eager, atol=1e-4)


@pytest.mark.parametrize("robot", ["ant", "humanoid"])
def test_compiled_env_step_gives_the_eager_steps(make_test_env, env_checks, robot):
    """env.compile_step(): same obs, rewards, flags (and AMP history) as an eager twin over random actions,
    across episode ends (short episodes) and reset_done()."""
    eager_env = make_test_env(robot, "heading", tag="speed-eager", episode_length_s=0.3)
    compiled_env = make_test_env(robot, "heading", tag="speed-compiled", episode_length_s=0.3)
    compiled_env.compile_step()
    generator = torch.Generator().manual_seed(2)
    for env in (eager_env, compiled_env):
        env.seed(4)
        env.reset()
    ended = False
    for step in range(15):
        actions = env_checks.random_actions(eager_env, generator)
        (obs_a, reward_a, done_a, extras_a), (obs_b, reward_b, done_b, extras_b) = (
            eager_env.step(actions), compiled_env.step(actions))
        torch.testing.assert_close(obs_b["obs"], obs_a["obs"], rtol=1e-5, atol=1e-5, msg=f"step {step}: obs")
        torch.testing.assert_close(reward_b, reward_a, rtol=1e-5, atol=1e-5, msg=f"step {step}: reward")
        assert torch.equal(done_b, done_a) and torch.equal(extras_b["terminate"], extras_a["terminate"])
        if "amp_obs" in extras_a:
            torch.testing.assert_close(extras_b["amp_obs"], extras_a["amp_obs"], rtol=1e-5, atol=1e-5)
        ended |= bool(done_a.any())
        if step % 5 == 4:
            eager_env.reset_done(), compiled_env.reset_done()
    assert ended  # episodes of 10 control steps ended within the 15 steps


def tiny_agent_and_batch(seed=0, num_envs=4, num_steps=4, obs_size=5, action_size=3, nan_advantage=False):
    """A small agent and one rollout's storage, advantages and returns, all from `seed`."""
    torch.manual_seed(seed)
    agent = hrl.Agent(obs_size, action_size, hidden_sizes=(16, 8))
    generator = torch.Generator().manual_seed(seed)
    obs = torch.randn(num_steps, num_envs, obs_size, generator=generator)
    with torch.no_grad():
        actions, logprobs, _, values, _ = agent.get_action_and_value(obs.reshape(-1, obs_size))
    shape = (num_steps, num_envs)
    storage = hrl.RolloutStorage(obs, actions.reshape(*shape, action_size), logprobs.reshape(shape), torch.zeros(shape),
                                 torch.zeros(shape), values.reshape(shape), torch.zeros(shape), torch.zeros(shape))
    advantages = torch.randn(shape, generator=generator)
    if nan_advantage:
        advantages[0, 1] = float("nan")  # one minibatch (advantages normalised per minibatch) turns non-finite
    return agent, storage, advantages, advantages + storage.values


def updated(args, updates=2, guard=None, **batch_options):
    """Parameters, Adam state and metrics after `updates` update_policy calls (torch seeded: same minibatches)."""
    agent, storage, advantages, returns = tiny_agent_and_batch(**batch_options)
    optimizer = hrl.make_optimizer(agent, args)
    torch.manual_seed(5)
    for _ in range(updates):
        metrics = hrl.update_policy(agent, optimizer, storage, advantages, returns, args, minibatch_size=4, guard=guard)
    adam_state = [state["exp_avg_sq"] for state in optimizer.state.values()]
    return [p.detach().clone() for p in agent.parameters()], adam_state, metrics, optimizer


def assert_same_update(got, expected, atol=1e-6):
    for a, b in zip(got[0] + got[1], expected[0] + expected[1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=atol)
    assert got[2].keys() == expected[2].keys()
    for key in expected[2]:
        torch.testing.assert_close(got[2][key], expected[2][key], rtol=1e-4, atol=1e-5, equal_nan=True, msg=key)


def test_compiled_update_equals_eager_with_clipping_and_the_nonfinite_guard():
    args = replace(hrl.Args(), update_epochs=2, num_minibatches=4, max_grad_norm=0.05)
    eager_guard, compiled_guard = hrl.NonfiniteGuard(10), hrl.NonfiniteGuard(10)
    eager = updated(args, guard=eager_guard, nan_advantage=True)
    compiled = updated(replace(args, compile="update"), guard=compiled_guard, nan_advantage=True)
    initial = tiny_agent_and_batch()[0]
    assert any(not torch.equal(p, q) for p, q in zip(eager[0], initial.parameters()))  # the update moved the policy
    # the minibatch holding the NaN is skipped in both (2 updates x 2 epochs), every parameter stays finite
    assert eager_guard.skipped == compiled_guard.skipped == 4
    assert all(torch.isfinite(p).all() for p in compiled[0])
    assert_same_update(compiled, eager)


def test_fused_adam_equals_default_adam_and_survives_a_checkpoint_round_trip():
    args = replace(hrl.Args(), update_epochs=2, num_minibatches=4, max_grad_norm=1.0)
    default, fused = updated(replace(args, fused_adam="off")), updated(replace(args, fused_adam="on"))
    assert all(group["fused"] for group in fused[3].param_groups)
    assert not any(group["fused"] for group in default[3].param_groups)
    assert_same_update(fused, default)
    # a checkpoint written with the default kernel restores it; the run's flag is put back afterwards
    optimizer = fused[3]
    optimizer.load_state_dict(default[3].state_dict())
    assert not optimizer.param_groups[0]["fused"]
    hrl.set_adam_kernel(optimizer, fused=True)
    assert optimizer.param_groups[0]["fused"] and not optimizer.param_groups[0]["foreach"]


def test_cuda_graph_flag_without_cuda_mjwarp_is_an_error_naming_what_it_needs(capsys):
    argv = ["--no-cuda", "--cuda-graph", "--num-envs", "8"]
    with pytest.raises(SystemExit, match="--cuda-graph needs CUDA and the mjwarp backend"):
        hrl.derive(hrl.parse_args(argv))
    assert not hrl.derive(hrl.parse_args(argv[:1])).cuda_graph


def test_captured_step_refuses_an_env_it_cannot_capture(make_test_env):
    env = make_test_env("ant", "heading", tag="speed")
    with pytest.raises(ValueError, match="--cuda-graph: the trainer runs on cpu"):
        hrl.CapturedHierarchicalStep(env, small_llc(env), LLC_STEPS, env.get_task_obs_size(), 0.0, 4)


# ---------------------------------------------------------------- CUDA: graph replay and fused Adam
def cuda_env(robot):
    """mjwarp on cuda:0 with short episodes and fast target resampling, so that within a few high-level steps
    worlds time out (reset_done between graph replays) and the env's generator draws inside the graph."""
    from tasks import make_env

    return make_env(robot, "heading", 8, device="cuda:0", seed=3, backend="mjwarp", episode_length_s=0.3,
                    resample_interval_s=(0.05, 0.2))


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("robot", ["ant", "humanoid"])
def test_cuda_graph_replay_equals_eager_steps(robot):
    graph_env, eager_env = cuda_env(robot), cuda_env(robot)
    llc = small_llc(graph_env, device="cuda:0")
    task_obs_size = graph_env.get_task_obs_size()
    captured = hrl.make_high_level_step(graph_env, llc, LLC_STEPS, task_obs_size, 0.0, 4, cuda_graph=True)
    assert isinstance(captured, hrl.CapturedHierarchicalStep)
    eager = hrl.make_high_level_step(eager_env, llc, LLC_STEPS, task_obs_size, 0.0, 4, cuda_graph=False)
    actions = latents(graph_env, 6)
    expected = run_high_level_steps(eager_env, eager, actions)
    got = run_high_level_steps(graph_env, captured, actions)
    assert any(bool(step.done.any()) for step in expected)  # episodes ended and were reset between replays
    assert_same_steps(got, expected, atol=1e-5)
    torch.testing.assert_close(graph_env.task_state["target_dir"], eager_env.task_state["target_dir"])


@pytest.mark.cuda
@requires_cuda
def test_fused_adam_on_cuda_equals_default_adam():
    args = replace(hrl.Args(), update_epochs=2, num_minibatches=4)

    def on_cuda(fused):
        agent, storage, advantages, returns = tiny_agent_and_batch()
        agent = agent.cuda()
        storage = hrl.RolloutStorage(*(t.cuda() for t in storage))
        optimizer = hrl.make_optimizer(agent, replace(args, fused_adam="on" if fused else "off"))
        torch.manual_seed(5)
        hrl.update_policy(agent, optimizer, storage, advantages.cuda(), returns.cuda(), args, minibatch_size=4)
        return [p.detach().cpu() for p in agent.parameters()]

    for a, b in zip(on_cuda(True), on_cuda(False)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- torchrun (gloo, CPU)
def test_compiled_update_and_fused_adam_under_torchrun_train_like_eager(tmp_path):
    """Two ranks, two iterations, gradient clipping on: --compile update --fused-adam on ends with the eager run's
    weights up to float rounding (the ranks' gradient all-reduce runs between the compiled backward and Adam)."""
    import glob

    from test_distributed import TINY, torchrun

    weights = {}
    for name, flags in (("eager", []), ("fast", ["--compile", "update", "--fused-adam", "on"])):
        cwd = tmp_path / name
        cwd.mkdir()
        torchrun("hrl_ppo_continuous.py", *TINY, "--total-timesteps", "160", "--max-grad-norm", "0.5", *flags, cwd=cwd)
        (path,) = glob.glob(str(cwd / "runs" / "*" / "checkpoint.pt"))
        checkpoint = torch.load(path, weights_only=True)
        # every optimiser step was taken: 2 iterations x 2 epochs x 2 minibatches (TINY), none skipped
        assert all(float(state["step"]) == 8 for state in checkpoint["optimizer"]["state"].values())
        weights[name] = checkpoint["agent"]
    for key, value in weights["eager"].items():
        torch.testing.assert_close(weights["fast"][key], value, rtol=1e-4, atol=1e-5, msg=key)
