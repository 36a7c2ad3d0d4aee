"""ASE's own body file (ase/data/assets/mjcf/amp_humanoid.xml), converted so that MuJoCo simulates it as
Isaac Gym did.

Isaac Gym reads the file differently from MuJoCo. In ASE's PD mode each hinge is driven towards a target
with kp = the joint's `stiffness` and kd = its `damping` (N m/rad, N m s/rad), its `armature` kept; the
`<motor gear>` values are the motors' effort limits (N m); the `<option timestep>` is ignored (ASE
simulates at 120 Hz: 60 Hz x 2 substeps) and the ground has friction 1. Loaded as it is, MuJoCo would
make the stiffness a passive spring towards 0, the motors torque actuators and, with the file's
`condim="1"` default class, every contact frictionless. `convert_ase_mjcf` edits the file's MjSpec in
memory:
    - one <position> actuator per hinge, in DoF order (the file's motors list the hips x, z, y), with
      kp = stiffness, kv = damping; force range +-gear of the joint's motor; no control range (the PD
      targets come from humanoid.pd_action_map and may lie past the joint limits on purpose)
    - joint stiffness and damping 0 (the PD actuators hold them), armature as in the file
    - every geom condim 3 with sliding friction 1.0 (torsional and rolling as in the file)
    - timestep 1/120 s, and the integrator and solver settings of assets/humanoid.xml
    - materials the file names but does not define (ASE's floor uses "grid") defined as a plain grey
The body and DoF order must be humanoid.BODY_NAMES and DOF_NAMES; anything else is an ASEModelError
naming the first difference. make_env's override robot_xml (the scripts' --robot-xml) runs the humanoid
on the converted model (humanoid.convert_robot_xml).

Not carried over: Isaac Gym's angular damping (0.01) and maximum angular velocity (100 rad/s) have no
MuJoCo counterpart.
"""

import mujoco

from tasks import humanoid

TIMESTEP = 1.0 / 120.0  # s: ASE's 60 Hz x 2 substeps
GROUND_FRICTION = 1.0  # sliding friction of ASE's ground plane
CONDIM = 3  # contact dimensions: normal force and 2-D sliding friction


class ASEModelError(ValueError):
    """An MJCF file that is not ASE's amp_humanoid layout; the message names the file and the difference."""


def convert_ase_mjcf(path):
    """ASE's amp_humanoid.xml at `path` as an MjSpec that simulates it as Isaac Gym did (module
    docstring); `.compile()` gives the MjModel."""
    try:
        spec = mujoco.MjSpec.from_file(str(path))
    except Exception as error:  # mujoco raises ValueError with the parser's message
        raise ASEModelError(f"{path}: cannot read the MJCF: {error}") from error
    hinges = check_layout(spec, path)
    efforts = _motor_efforts(spec)
    for actuator in list(spec.actuators):
        spec.delete(actuator)
    for joint in hinges:
        _add_pd_actuator(spec, joint, efforts.get(joint.name))
    for geom in spec.geoms:
        geom.condim = CONDIM
        geom.friction[0] = GROUND_FRICTION
    _define_missing_materials(spec)
    _set_options(spec)
    return spec


def _first_difference(kind, found, expected, path):
    """ASEModelError naming the first position where `found` and `expected` names differ."""
    index = next((i for i, (a, b) in enumerate(zip(found, expected)) if a != b), min(len(found), len(expected)))
    got = repr(found[index]) if index < len(found) else "nothing"
    want = repr(expected[index]) if index < len(expected) else "nothing"
    return ASEModelError(f"{path}: {kind} {index} is {got}, expected {want} ({len(found)} {kind}s, expected "
                         f"{len(expected)}: the humanoid needs ASE's amp_humanoid layout {list(expected)})")


def check_layout(spec, path):
    """The robot's bodies in BODY_NAMES order, a free root joint and one hinge per DOF_NAMES entry, in
    that order; returns the hinge joints."""
    bodies = tuple(body.name for body in spec.bodies[1:])  # spec.bodies[0] is the world
    if bodies != humanoid.BODY_NAMES:
        raise _first_difference("body", bodies, humanoid.BODY_NAMES, path)
    joints = list(spec.joints)
    if not joints or joints[0].type != mujoco.mjtJoint.mjJNT_FREE:
        raise ASEModelError(f"{path}: the first joint must be the root's free joint, found "
                            f"{joints[0].name + ' (' + joints[0].type.name + ')' if joints else 'no joints'}")
    hinges = joints[1:]
    names = tuple(joint.name for joint in hinges)
    if names != humanoid.DOF_NAMES:
        raise _first_difference("DoF", names, humanoid.DOF_NAMES, path)
    not_hinges = [joint.name for joint in hinges if joint.type != mujoco.mjtJoint.mjJNT_HINGE]
    if not_hinges:
        raise ASEModelError(f"{path}: joints {not_hinges} are not hinges; every DoF of the humanoid is a hinge")
    return hinges


def _motor_efforts(spec):
    """{joint name: effort limit (N m)} from the file's joint actuators: gear, as Isaac Gym reads it."""
    return {actuator.target: float(actuator.gear[0]) for actuator in spec.actuators
            if actuator.trntype == mujoco.mjtTrn.mjTRN_JOINT}


def _add_pd_actuator(spec, joint, effort):
    """Position actuator on `joint` with kp = its stiffness, kv = its damping, which then become 0."""
    kp, kv = float(joint.stiffness[0]), float(joint.damping[0])
    joint.stiffness[0] = joint.damping[0] = 0.0
    actuator = spec.add_actuator(name=joint.name, target=joint.name, trntype=mujoco.mjtTrn.mjTRN_JOINT)
    actuator.set_to_position(kp=kp, kv=kv)
    actuator.ctrllimited = mujoco.mjtLimited.mjLIMITED_FALSE
    if effort is not None:
        actuator.forcelimited = mujoco.mjtLimited.mjLIMITED_TRUE
        actuator.forcerange = [-abs(effort), abs(effort)]
    else:
        actuator.forcelimited = mujoco.mjtLimited.mjLIMITED_FALSE


def _define_missing_materials(spec):
    defined = {material.name for material in spec.materials}
    for name in sorted({geom.material for geom in spec.geoms if geom.material} - defined):
        spec.add_material(name=name, rgba=[0.4, 0.45, 0.5, 1.0])


def _set_options(spec):
    """ASE's timestep; integrator and solver as the project's humanoid (implicit PD damping)."""
    ours = humanoid.default_model().opt
    spec.option.timestep = TIMESTEP
    spec.option.integrator = int(ours.integrator)
    spec.option.solver = int(ours.solver)
    spec.option.iterations = int(ours.iterations)
    spec.option.ls_iterations = int(ours.ls_iterations)
