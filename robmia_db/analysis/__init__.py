"""Analysis layer: statistics over stored scores (paired comparisons, the paper's findings decided).

May import `attacks` (metrics, intervals), `store`, `spec` and `errors`; never the runner or torch.
"""
