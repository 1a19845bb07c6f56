"""The view table: every context a response can be scored under, by whose policy and with which
privileged level. Methods name views from it; adapters build the prompts it describes."""
from __future__ import annotations

# view -> (policy, privileged level): level None = no p, "full" = p, "partial" = partial(p)
VIEW_SPEC: dict[str, tuple[str, str | None]] = {
    "student": ("student", None),
    "student_priv": ("student", "full"),
    "teacher_full": ("teacher", "full"),
    "teacher_partial": ("teacher", "partial"),
    "teacher_plain": ("teacher", None),
    "student_init_priv": ("student_init", "full"),  # the initial student, frozen, reading p
    "student_init": ("student_init", None),  # the initial student, frozen, without p
}
VIEWS = tuple(VIEW_SPEC)
