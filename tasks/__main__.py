"""Print the sizes of every robot / task pair: python -m tasks"""

import mujoco

from tasks import ROBOTS, TASKS, load_robot, load_task


def sizes(robot, task):
    mjm = mujoco.MjModel.from_xml_path(robot.MJCF_PATH)
    control_dt = robot.DECIMATION * mjm.opt.timestep
    return {"num_obs": robot.NUM_ROBOT_OBS + task.TASK_OBS_SIZE, "task_obs": task.TASK_OBS_SIZE,
            "num_actions": mjm.nu, "control_dt": round(control_dt, 6),
            "max_episode_length": max(1, round(robot.EPISODE_LENGTH_S / control_dt))}


if __name__ == "__main__":
    header = ("robot", "task", "num_obs", "task_obs", "num_actions", "control_dt", "max_episode_length")
    print("  ".join(f"{h:>18}" for h in header))
    for robot_name in ROBOTS:
        try:
            robot = load_robot(robot_name)
        except ImportError as error:
            print(f"{robot_name:>18}  (not available: {error})")
            continue
        for task_name in TASKS:
            row = {"robot": robot_name, "task": task_name, **sizes(robot, load_task(task_name))}
            print("  ".join(f"{row[h]!s:>18}" for h in header))
