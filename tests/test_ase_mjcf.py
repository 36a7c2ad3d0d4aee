"""ASE's MJCF converted for MuJoCo (tasks/ase_mjcf.py), on a small model written here in the style of
ASE's amp_humanoid.xml: joint stiffness / damping / armature (some from the default class), motors with
gears listed out of DoF order, condim 1 in the default class, a floor with an undefined material."""

import mujoco
import numpy as np
import pytest

import tasks.humanoid as humanoid
from tasks.ase_mjcf import ASEModelError, convert_ase_mjcf

OURS = mujoco.MjModel.from_xml_path(humanoid.MJCF_PATH)  # the body tree and joint axes to copy
# kp, kd, armature per joint as in ASE's file; the neck takes the default class (stiffness 5, damping 0.1)
GAINS = {"abdomen": (1000, 100, 0.02), "right_shoulder": (400, 40, 0.02), "left_shoulder": (400, 40, 0.02),
         "right_elbow": (300, 30, 0.01), "left_elbow": (300, 30, 0.01), "right_hip": (500, 50, 0.02),
         "left_hip": (500, 50, 0.02), "right_knee": (500, 50, 0.02), "left_knee": (500, 50, 0.02),
         "right_ankle": (400, 40, 0.01), "left_ankle": (400, 40, 0.01)}
DEFAULT_GAINS = (5.0, 0.1, 0.007)
GEARS = {"abdomen": 200, "neck": 50, "shoulder": 100, "elbow": 70, "hip": 200, "knee": 150, "ankle": 90}


def joint_group(dof_name):
    return next(joint for joint, _ in humanoid.JOINTS if dof_name.startswith(joint))


def gear(dof_name):
    return next(g for part, g in GEARS.items() if part in dof_name)


def body_xml(body, swap_torso_children=False, swap_abdomen_dofs=False):
    joints = [j for j in range(1, OURS.njnt) if OURS.jnt_bodyid[j] == body]
    if swap_abdomen_dofs and OURS.body(body).name == "torso":
        joints[0], joints[1] = joints[1], joints[0]
    lines = [f'<body name="{OURS.body(body).name}" pos="{" ".join(map(str, OURS.body_pos[body]))}"'
             + (' childclass="body">' if body == 1 else ">")]
    lines += ['<freejoint name="root"/>', '<site name="root"/>'] if body == 1 else []
    for j in joints:
        name, (lo, hi) = OURS.joint(j).name, np.degrees(OURS.jnt_range[j])
        gains = GAINS.get(joint_group(name))
        attributes = f' stiffness="{gains[0]}" damping="{gains[1]}" armature="{gains[2]}"' if gains else ""
        lines.append(f'<joint name="{name}" axis="{" ".join(map(str, OURS.jnt_axis[j]))}" range="{lo} {hi}"{attributes}/>')
    lines.append(f'<geom name="{OURS.body(body).name}" type="sphere" size="0.05" density="1000"/>')
    children = [b for b in range(1, OURS.nbody) if OURS.body_parentid[b] == body]
    if swap_torso_children and OURS.body(body).name == "torso":
        children = [children[0], children[2], children[1]]  # head, left arm, right arm
    lines += [body_xml(child, swap_torso_children, swap_abdomen_dofs) for child in children]
    return "\n".join(lines + ["</body>"])


def ase_style_mjcf(path, **swaps):
    dofs = list(humanoid.DOF_NAMES)
    dofs[15], dofs[16] = dofs[16], dofs[15]  # ASE lists the right hip's motors x, z, y
    motors = "\n".join(f'<motor name="{d}" gear="{gear(d)}" joint="{d}"/>' for d in dofs)
    path.write_text(f"""<mujoco model="humanoid">
  <option timestep="0.00555"/>
  <default>
    <motor ctrlrange="-1 1" ctrllimited="true"/>
    <default class="body">
      <geom type="capsule" condim="1" friction="1.0 0.05 0.05" solimp=".9 .99 .003" solref=".015 1"/>
      <joint type="hinge" damping="{DEFAULT_GAINS[1]}" stiffness="{DEFAULT_GAINS[0]}" armature="{DEFAULT_GAINS[2]}"
             limited="true" solimplimit="0 .99 .01"/>
    </default>
  </default>
  <worldbody>
    <geom name="floor" type="plane" conaffinity="1" size="100 100 .2" material="grid"/>
    {body_xml(1, **swaps)}
  </worldbody>
  <actuator>{motors}</actuator>
  <sensor><velocimeter name="root_vel" site="root"/></sensor>
</mujoco>""")
    return path


@pytest.fixture
def converted(tmp_path):
    return convert_ase_mjcf(ase_style_mjcf(tmp_path / "amp_humanoid.xml")).compile()


def test_pd_actuators_from_joint_stiffness_and_damping(converted):
    m = converted
    assert m.nu == 28
    assert [m.joint(j).name for j in m.actuator_trnid[:, 0]] == list(humanoid.DOF_NAMES)  # DoF order
    for i, name in enumerate(humanoid.DOF_NAMES):
        kp, kv, armature = GAINS.get(joint_group(name), DEFAULT_GAINS)
        assert m.actuator_gaintype[i] == mujoco.mjtGain.mjGAIN_FIXED and m.actuator_gainprm[i, 0] == kp, name
        assert m.actuator_biastype[i] == mujoco.mjtBias.mjBIAS_AFFINE, name
        np.testing.assert_allclose(m.actuator_biasprm[i, :3], [0.0, -kp, -kv], err_msg=name)
        assert m.dof_armature[6 + i] == pytest.approx(armature), name
        np.testing.assert_allclose(m.actuator_forcerange[i], [-gear(name), gear(name)], err_msg=name)
    assert m.actuator_forcelimited.all() and not m.actuator_ctrllimited.any()
    assert not m.jnt_stiffness.any() and not m.dof_damping.any()


def test_no_passive_spring_left(converted):
    """Displaced joints feel no passive force: the stiffness now lives in the PD actuators."""
    data = mujoco.MjData(converted)
    data.qpos[2], data.qpos[3] = 1.0, 1.0
    data.qpos[7:] = 0.3
    data.qvel[6:] = 1.0
    mujoco.mj_forward(converted, data)
    np.testing.assert_array_equal(data.qfrc_passive[6:], 0.0)


def test_friction_condim_and_timestep(converted):
    assert (converted.geom_condim == 3).all()
    np.testing.assert_array_equal(converted.geom_friction[:, 0], 1.0)
    assert converted.opt.timestep == pytest.approx(1.0 / 120.0)
    assert converted.opt.integrator == OURS.opt.integrator


def test_wrong_body_order_is_a_clear_error(tmp_path):
    path = ase_style_mjcf(tmp_path / "arms_swapped.xml", swap_torso_children=True)
    with pytest.raises(ASEModelError, match=r"arms_swapped\.xml: body 3 is 'left_upper_arm', expected 'right_upper_arm'"):
        convert_ase_mjcf(path)


def test_wrong_dof_order_is_a_clear_error(tmp_path):
    path = ase_style_mjcf(tmp_path / "dofs_swapped.xml", swap_abdomen_dofs=True)
    with pytest.raises(ASEModelError, match=r"dofs_swapped\.xml: DoF 0 is 'abdomen_y', expected 'abdomen_x'"):
        convert_ase_mjcf(path)


def test_unreadable_file_is_a_clear_error(tmp_path):
    (tmp_path / "broken.xml").write_text("<mujoco><worldbody><body></mujoco>")
    with pytest.raises(ASEModelError, match=r"broken\.xml: cannot read the MJCF"):
        convert_ase_mjcf(tmp_path / "broken.xml")
