"""The editor's loop (SPEC 12): answers about segments, saved as annotations, served for review.

``store``: the review files under ``OUT/reviews/`` (one file per answer; the latest answer per
segment wins) and what they mean as training spans. ``page``: the review page. ``server``: the
HTTP server of ``kissray review``. Importing this package imports none of them.
"""
