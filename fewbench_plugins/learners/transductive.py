"""Transductive methods on frozen features: TIM, PT-MAP, LaplacianShot and BD-CSPN.

Each classifies a query with the help of the episode's other queries, so the protocol card
marks its cells transductive (``transductive_because``) and reports put them in a block of
their own. Each runs on the features of a frozen backbone, trained by the cell with
SimpleShot's recipe or given by its ``weights`` (``feature_heads.py`` says how), and
implements its paper's algorithm as the authors' code runs it
(:mod:`fewbench.methods.transductive`); the deviations are listed per class. None of the
four papers reports Omniglot.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from fewbench.methods.feature_heads import class_means
from fewbench.methods.transductive import (
    bd_cspn,
    centre_each_set,
    laplacian_shot,
    power_transform,
    pt_map,
    rectify_prototypes,
    shift_queries,
    tim_gd,
)
from fewbench.plugin import FewbenchError, Learner, Param, hookimpl
from fewbench_plugins.learners.feature_heads import FrozenFeatureLearner, frozen_params


class TIM(FrozenFeatureLearner):
    """TIM-GD (Boudiaf, Ziko, Rony, Dolz, Piantanida & Ben Ayed, "Information Maximization for
    Few-Shot Learning", NeurIPS 2020, arXiv:2008.11297; code github.com/mboudiaf/TIM,
    ``src/tim.py``).

    Eq. 3, as ``TIM_GD`` runs it: L2-normalised features (the code computes a base mean but
    does not subtract it: ``transform: L2N``); class weights initialised at the support
    means; logits ``-temperature / 2 * ||x - w_k||^2`` with temperature 15; the loss
    ``0.1 * CE(support) - (1.0 * H(Y_Q) - 0.1 * H(Y_Q | X_Q))``; Adam on the weights alone,
    learning rate 1e-4, 1000 iterations (the paper's scripts; the code's default is 150).
    Deviation: TIM's backbone was trained with label smoothing 0.1; a cell that trains its own
    backbone uses ``label_smoothing`` (0 by default, SimpleShot's recipe, so that TIM and
    SimpleShot share the backbone a suite gives them)."""

    name = "tim"
    display_name = "TIM-GD"
    description = "Transductive information maximisation, gradient descent (Boudiaf et al. 2020)"
    adaptation = "class weights fitted by Adam on the support cross-entropy and the query set's mutual information"
    transductive_because = (
        "maximises the mutual information between the query set's features and labels"
    )
    params = frozen_params(
        "L2N",
        "TIM's: L2N",
        temperature=Param(15.0, minimum=0.0, help="logit temperature (TIM: 15)"),
        loss_weights=Param(
            [0.1, 1.0, 0.1],
            item_type=float,
            minimum=0.0,
            help="weights of CE(support), H(Y_Q) and H(Y_Q|X_Q) (TIM: 0.1, 1.0, 0.1)",
        ),
        tim_lr=Param(1e-4, minimum=0.0, help="Adam learning rate of the weights (TIM: 1e-4)"),
        tim_iterations=Param(1000, minimum=1, help="Adam iterations (TIM-GD: 1000)"),
    )

    def check(self) -> None:
        if len(self.config["loss_weights"]) != 3:
            raise FewbenchError(
                "learner tim: loss_weights needs three values (CE, H(Y_Q), H(Y_Q|X_Q)), got "
                f"{self.config['loss_weights']}"
            )

    def head(self, support: Tensor, labels: Tensor, queries: Tensor, ways: int) -> Tensor:
        return tim_gd(
            self.transformed(support),
            labels,
            self.transformed(queries),
            ways,
            temperature=self.config["temperature"],
            loss_weights=tuple(self.config["loss_weights"]),
            lr=self.config["tim_lr"],
            iterations=self.config["tim_iterations"],
        )


class PTMAP(FrozenFeatureLearner):
    """PT-MAP (Hu, Gripon & Pateux, "Leveraging the Feature Distribution in Transfer-based
    Few-Shot Learning", ICANN 2021, arXiv:2006.03806; code github.com/yhu01/PT-MAP,
    ``test_standard.py``).

    Eq. 1's power transform ``(x + 1e-6) ** 0.5`` and L2 normalisation, then the code's
    ``centerDatas`` (support and query sets each centred on their own mean and
    normalised again), then Algorithm 1: centres from the support means; 20 epochs of a
    Sinkhorn plan (``lam`` 10, each class given an equal share of the queries; stops at a
    row-sum change of 1e-6 or 1000 rounds) and a move of ``alpha`` 0.2 towards the plan's
    weighted means, the support keeping its labels; the final plan labels the queries.
    Deviations: the code's QR reduction of each task's features is left out (it changes no
    inner product, so no distance); the Sinkhorn kernel subtracts each episode's smallest
    cost before exponentiating (the plan is normalised, so it is the same plan, without
    underflow); the paper's backbone is a WRN-28-10 trained with S2M2_R. The equal share
    assumes classes of equal size in the query set, which fewbench's test episodes have
    (``eval.query`` per class): PT-MAP exploits that."""

    name = "pt_map"
    display_name = "PT-MAP"
    description = "Power transform + MAP estimation with Sinkhorn (Hu et al. 2021)"
    adaptation = "class centres re-estimated from Sinkhorn soft labels of the query set"
    transductive_because = "estimates the class centres from the soft labels of the query set"
    params = frozen_params(
        "UN",
        "PT-MAP transforms its own way (power transform, centring): UN",
        beta=Param(0.5, minimum=0.0, help="power transform exponent (PT-MAP: 0.5)"),
        lam=Param(10.0, minimum=0.0, help="Sinkhorn's lambda (PT-MAP: 10)"),
        alpha=Param(0.2, minimum=0.0, help="centre update rate (PT-MAP: 0.2)"),
        epochs=Param(20, minimum=0, help="MAP epochs (PT-MAP: 20)"),
    )

    def head(self, support: Tensor, labels: Tensor, queries: Tensor, ways: int) -> Tensor:
        beta = self.config["beta"]
        support, queries = centre_each_set(
            power_transform(self.transformed(support), beta),
            power_transform(self.transformed(queries), beta),
        )
        return pt_map(
            support,
            labels,
            queries,
            ways,
            lam=self.config["lam"],
            alpha=self.config["alpha"],
            epochs=self.config["epochs"],
        )


class LaplacianShot(FrozenFeatureLearner):
    """LaplacianShot (Ziko, Dolz, Granger & Ben Ayed, "Laplacian Regularized Few-Shot
    Learning", ICML 2020, arXiv:2006.15486; code github.com/imtiazziko/LaplacianShot,
    ``src/train_lshot.py``, ``src/lshot_update.py``).

    CL2N features (SimpleShot's, the base-class mean); the prototypes rectified as BD-CSPN
    does (the code's ``proto_rect``: queries shifted by the support-query mean difference,
    prototypes re-weighted with pseudo-labelled queries); then Algorithm 1's bound
    optimisation, ``Y = softmax(-a + lam * W Y)`` with unary ``a`` the squared distances to
    the prototypes and ``W`` the binary 3-nearest-neighbour graph of the queries (itself
    counted, then dropped; not symmetrised), at most 20 rounds, until the energy changes
    by 1e-6 of itself. Deviations: ``lam`` is fixed (1.0, the code's default) where the
    authors' script tunes it per shot on 500 validation episodes (a suite can tune it with
    ``fewbench tune``); the rectification is BD-CSPN's as its paper states it (support with
    its true labels, all pseudo-labelled queries, weights normalised over each class's
    examples), where the code pseudo-labels the support too and divides by the count."""

    name = "laplacianshot"
    display_name = "LaplacianShot"
    description = "Nearest prototype + Laplacian regularisation over the queries (Ziko et al. 2020)"
    adaptation = "assignments of the queries by bound optimisation with a kNN Laplacian term"
    transductive_because = (
        "a Laplacian term over the query set's nearest-neighbour graph couples the queries"
    )
    params = frozen_params(
        "CL2N",
        "LaplacianShot's: CL2N",
        lam=Param(1.0, minimum=0.0, help="weight of the Laplacian term (the code's default: 1)"),
        knn=Param(3, minimum=1, help="neighbours in the affinity, itself included (the code: 3)"),
        rectify=Param(True, help="rectify the prototypes as BD-CSPN (the code: yes)"),
        max_iter=Param(20, minimum=1, help="bound-update rounds at most (the code: 20)"),
    )

    def head(self, support: Tensor, labels: Tensor, queries: Tensor, ways: int) -> Tensor:
        support, queries = self.transformed(support), self.transformed(queries)
        if self.config["rectify"]:
            queries = shift_queries(support, queries)
            prototypes = rectify_prototypes(support, labels, queries, ways, top_z=None)
        else:
            prototypes = class_means(support, labels, ways)
        return laplacian_shot(
            prototypes,
            queries,
            lam=self.config["lam"],
            knn=self.config["knn"],
            max_iter=self.config["max_iter"],
        )


class BDCSPN(FrozenFeatureLearner):
    """BD-CSPN (Liu, Song & Qin, "Prototype Rectification for Few-Shot Learning", ECCV 2020,
    arXiv:1911.10713).

    Sec. 3.3's cross-class bias diminishing (every query shifted by ``mean(S) - mean(Q)``),
    Sec. 3.2's intra-class bias diminishing (each class's prototype the softmax-weighted mean,
    ``epsilon`` 10 times the cosine to the basic prototype, of its support examples and its
    ``top_z`` most confident pseudo-labelled queries), then the cosine classifier.
    Deviations: the paper's backbone and its cosine-classifier pretraining are replaced by the
    shared frozen backbone; ``top_z`` 8 is not confirmed from the paper's text here (only its
    abstract could be read); L2N features (the cosine classifier's normalisation)."""

    name = "bd_cspn"
    display_name = "BD-CSPN"
    description = "Prototypes rectified with pseudo-labelled queries (Liu et al. 2020)"
    adaptation = "prototypes rectified with shifted, pseudo-labelled queries (no gradient step)"
    transductive_because = (
        "shifts the queries by the query set's mean and rectifies the prototypes with "
        "pseudo-labelled queries"
    )
    params = frozen_params(
        "L2N",
        "BD-CSPN's cosine classifier: L2N",
        top_z=Param(8, minimum=1, help="pseudo-labelled queries added per class"),
        epsilon=Param(10.0, minimum=0.0, help="softmax scale of the cosine weights (10)"),
    )

    def head(self, support: Tensor, labels: Tensor, queries: Tensor, ways: int) -> Tensor:
        return bd_cspn(
            self.transformed(support),
            labels,
            self.transformed(queries),
            ways,
            top_z=self.config["top_z"],
            epsilon=self.config["epsilon"],
        )


LEARNERS: tuple[type[Learner], ...] = (TIM, PTMAP, LaplacianShot, BDCSPN)


@hookimpl
def fewbench_register_learners(register: Callable[[type], None]) -> None:
    for learner in LEARNERS:
        register(learner)
