"""A tiny torch VecTask honouring the IsaacGymEnvs interface (no isaacgym import, so unit tests
can use it after torch): step() returns (obs_dict, reward, reset_buf, extras) with
extras["time_outs"], and envs flagged in reset_buf are reset at the start of the NEXT step's
post-physics update, as IsaacGymEnvs tasks do.

Dynamics: a point mass with 3 actuated axes; reward for staying near a target; it fails when
it leaves the box |x| < 2. Observation: position (3), velocity (3), then an ASE-style task
observation: the target's first two coordinates (2)."""
import torch


class FakeVecTask:
    def __init__(self, num_envs, device="cpu", seed=0, max_episode_length=24):
        self.num_envs, self.rl_device, self.device = num_envs, device, device
        self.num_obs, self.num_actions = 8, 3
        self.dt, self.max_episode_length = 1.0 / 30.0, max_episode_length
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.pos = torch.zeros(num_envs, 3, device=device)
        self.vel = torch.zeros(num_envs, 3, device=device)
        self.target = torch.zeros(num_envs, 3, device=device)
        self.progress_buf = torch.zeros(num_envs, dtype=torch.long, device=device)
        self.reset_buf = torch.ones(num_envs, dtype=torch.long, device=device)
        self.steps_taken = 0

    def get_task_obs_size(self):
        return 2

    def reset_idx(self, env_ids):
        n = len(env_ids)
        self.pos[env_ids] = 0.3 * torch.randn(n, 3, device=self.device, generator=self.generator)
        self.vel[env_ids] = 0.0
        self.target[env_ids] = torch.rand(n, 3, device=self.device, generator=self.generator) - 0.5
        self.progress_buf[env_ids] = 0
        self.reset_buf[env_ids] = 0

    def obs_dict(self):
        return {"obs": torch.cat([self.pos, self.vel, self.target[:, :2]], dim=-1)}

    def reset(self):
        self.reset_idx(torch.arange(self.num_envs, device=self.device))
        return self.obs_dict()

    def step(self, actions):
        self.steps_taken += 1
        actions = torch.clamp(actions, -1.0, 1.0)
        self.vel = 0.9 * self.vel + 0.3 * actions
        self.pos = self.pos + self.dt * 5.0 * self.vel
        self.progress_buf += 1
        env_ids = self.reset_buf.nonzero(as_tuple=False).squeeze(-1)
        if len(env_ids) > 0:
            self.reset_idx(env_ids)
        distance = (self.pos - self.target).norm(dim=-1)
        reward = torch.exp(-2.0 * distance**2)
        fell = (self.pos.abs() > 2.0).any(-1)
        timed_out = self.progress_buf >= self.max_episode_length - 1
        self.reset_buf = (fell | timed_out).long()
        extras = {"time_outs": timed_out & ~fell}
        return self.obs_dict(), reward, self.reset_buf.clone(), extras


def make_fake_vec_task(seed, task, num_envs, sim_device, rl_device, graphics_device_id=-1, headless=True):
    """A user factory for --env-factory fake_vec_task:make_fake_vec_task."""
    return FakeVecTask(num_envs=num_envs, device=rl_device, seed=seed)
