"""Mathematics that learners share: the MAML family's inner loop (``adaptation``), policy
gradients and TRPO (``policy_gradient``), a training step captured as one CUDA graph
(``cuda_graphs``), the training-time augmentations (``augment``), classifiers on frozen
features (``feature_heads``), transductive ones (``transductive``) and MetaOptNet's
differentiable SVM (``svm``) and P>M>F's fine-tuning on a support set (``finetuning``)."""
