"""2-D navigation with a point robot (Finn, Abbeel & Levine 2017, section 5.3).

"In the first set of experiments, [...] a point agent must move to different goal
positions in 2D, randomly chosen for each task within a unit square. The observation is
the current 2D position, and actions correspond to velocity commands clipped to be in
the range [-0.1, 0.1]. The reward is the negative squared distance to the goal, and
episodes terminate when the agent is within 0.01 of the goal or at the horizon of
H = 100." (Finn et al. 2017, section 5.3.)

What each part implements (paper = section 5.3; code = the authors' ``cbfinn/maml_rl``,
``maml_examples/point_env_randgoal.py`` wrapped in rllab's ``normalize``; both as read
in ``docs/design/maml-rl.md``, section 1.1):

* :meth:`Navigation2D.sample_tasks`: a goal ``g ~ U([-0.5, 0.5]^2)``, the "unit
  square" of the paper, centred on the origin as the code's ``sample_goals`` draws it.
* :meth:`Navigation2D.reset`: every episode starts at the origin (code; the paper is
  silent). The environment itself is deterministic: it draws nothing from the
  generators, all randomness is the policy's noise.
* :meth:`Navigation2D.observe`: the 2-D position (paper and code); the goal is not
  observed. The oracle (``observe_task=True`` in a rollout) appends the goal, a 4-d
  observation, as the code's ``point_env_randgoal_oracle.py``.
* :meth:`Navigation2D.step`: ``s <- s + clip(action_scale * a, -0.1, 0.1)``, then the
  reward at the new position, and ``done`` when ``||s - g||_2 < done_radius``.
* ``horizon``: 100 steps (paper; the code's ``max_path_length``). After an episode ends
  the rollout's mask hides its steps (:class:`fewbench.plugin.environment.Trajectories`).

Deliberate deviations from the authors' code, chosen in ``docs/design/maml-rl.md``
section 5 (the issue says to follow the paper where paper and code disagree):

* **Reward.** ``reward: squared`` (the default) is the paper's ``-||s - g||^2``; the
  code computes ``-||s - g||`` (the Euclidean distance, not squared), and so do the
  PyTorch ports. ``reward: distance`` is the code's reward, and the **only setting
  whose returns are comparable with the paper's Table 4** (MAML's 2-D returns
  -40.41 / -11.68 / -3.33 / -3.23 after 0 / 1 / 2 / 3 gradient steps): those numbers
  came from the code. As a scale: a policy that stays at the origin earns on average
  ``-100 E||g|| = -38.3`` with ``distance`` but ``-100 E||g||^2 = -16.7`` with
  ``squared``.
* **Termination.** A disc, ``||s - g||_2 < 0.01`` (the paper's "within 0.01 of the
  goal"); the code ends an episode in a box, ``|dx| < 0.01 and |dy| < 0.01``.
* **Action scaling.** The policy acts in ``[-1, 1]`` units and the environment applies
  ``clip(0.1 * a, -0.1, 0.1)``: the code's ``normalize`` wrapper maps the policy's
  ``a`` to ``lb + (a + 1) (ub - lb) / 2 = 0.1 a`` for the action box ``[-0.1, 0.1]^2``
  and then clips. The paper only says "clipped". This is not a deviation from the
  code but from ``pytorch-maml-rl``, which clips the raw output (a Gaussian policy of
  initial std 1 then saturates almost always). ``action_scale: 1.0`` gives that.

Nothing here is random beyond the goal: given the policy's noise (drawn by the base
class from each task's own generator) a rollout is a pure function of the task, so
rolling out any chunk of tasks gives the same tensors as rolling out each alone.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from fewbench.plugin import Environment, Param, hookimpl

GOAL_LOW, GOAL_HIGH = -0.5, 0.5  # the unit square of goals (code: sample_goals)
MAX_VELOCITY = 0.1  # the paper's clipping of velocity commands, per coordinate


class Navigation2D(Environment):
    name = "navigation2d"
    description = (
        "2-D point-robot navigation to a goal in a unit square (Finn et al. 2017, section 5.3)"
    )
    params = {
        "reward": Param(
            "squared",
            choices=("squared", "distance"),
            help="squared: -||s-g||^2 (the paper); distance: -||s-g|| (the authors' code, "
            "the only setting comparable with the paper's Table 4 returns)",
        ),
        "horizon": Param(100, minimum=1, help="steps per episode (the paper's H = 100)"),
        "action_scale": Param(
            0.1,
            minimum=0.0,
            help="velocity = clip(action_scale * action, -0.1, 0.1); 0.1 is the code's "
            "normalize wrapper (the policy acts in [-1, 1] units), 1.0 clips the raw action",
        ),
        "done_radius": Param(
            0.01,
            minimum=0.0,
            help="an episode ends when the Euclidean distance to the goal is below this",
        ),
    }
    # The goal distribution is fixed: no parameter changes which tasks are drawn, so the
    # fixed validation and test goals are the same for every reward, horizon, scale and
    # radius, and results of such variants pair task by task.
    episode_identity: ClassVar[tuple[str, ...]] = ()

    task_dim = 2  # the goal
    observation_dim = 2  # the position
    action_dim = 2  # a velocity command

    def __init__(self, **params):
        super().__init__(**params)
        config = self.config
        if config["reward"] not in ("squared", "distance"):
            raise ValueError(
                f"navigation2d: reward must be 'squared' or 'distance', got {config['reward']!r}"
            )
        if int(config["horizon"]) < 1:
            raise ValueError(f"navigation2d: horizon must be at least 1, got {config['horizon']}")
        self.horizon = int(config["horizon"])
        self.action_scale = float(config["action_scale"])
        self.done_radius = float(config["done_radius"])
        self.squared = config["reward"] == "squared"

    def sample_tasks(self, count: int, generator: torch.Generator) -> Tensor:
        """Goals ``float32[count, 2]`` uniform in ``[-0.5, 0.5]^2``."""
        return GOAL_LOW + (GOAL_HIGH - GOAL_LOW) * torch.rand(
            (count, 2), generator=generator, dtype=torch.float32
        )

    def reset(self, tasks: Tensor, generators: list[torch.Generator], trajectories: int) -> Tensor:
        """Positions ``[T, N, 2]``: every episode starts at the origin (draws nothing)."""
        return torch.zeros(tasks.shape[0], trajectories, 2, dtype=tasks.dtype, device=tasks.device)

    def observe(self, state: Tensor) -> Tensor:
        """The position itself."""
        return state

    def step(self, state: Tensor, actions: Tensor, tasks: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Move by the clipped velocity, then reward and termination at the new position.

        The dynamics are not differentiated: the actions are detached, as a simulator
        stepped elsewhere (the cheetah) would treat them, so no graph grows along a rollout."""
        velocity = (self.action_scale * actions.detach()).clamp(-MAX_VELOCITY, MAX_VELOCITY)
        position = state + velocity.to(state.dtype)
        offset = position - tasks[:, None, :]
        squared = (offset * offset).sum(dim=-1)
        distance = squared.sqrt()
        reward = -squared if self.squared else -distance
        return position, reward, distance < self.done_radius


@hookimpl
def fewbench_register_environments(register):
    register(Navigation2D)
