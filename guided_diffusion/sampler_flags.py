"""The sampler flags of image_sample.py, the sweeps and in-training evaluation, resolved into SamplingOptions fields.

--sampler ancestral|ddim|dpm++2m|dpm++2m_sde|heun ("" = today's choice: DDIM with --use_ddim True, else ancestral).
The ancestral and DDIM samplers step through the --timestep_respacing grid; the others (guided_diffusion/
ode_samplers.py) take --steps (0 = their default) and --step_schedule ("" = their default) on the model's full
schedule. heun also takes EDM Algorithm 2's churn: --heun_churn (S_churn; 0 = Algorithm 1), --heun_s_tmin,
--heun_s_tmax and --heun_s_noise (ode_samplers.HeunChurn). A flag that the chosen sampler would not use is an error
naming both flags, never silently dropped.
"""

from dataclasses import asdict

from .ode_samplers import DEFAULT_STEP_SCHEDULE, DEFAULT_STEPS, NO_CHURN, SAMPLERS, STEP_SCHEDULES

RESPACED_SAMPLERS = ("ancestral", "ddim")
SAMPLER_CHOICES = RESPACED_SAMPLERS + SAMPLERS


def resolve_sampler(sampler, steps=0, step_schedule="", use_ddim=None, ddim_eta=0.0, timestep_respacing=None,
                    prefix="", heun_churn=NO_CHURN):
    """SamplingOptions fields (use_ddim, ddim_eta, sampler, steps, step_schedule, heun_churn) from the flag values.

    :param sampler: "" or one of SAMPLER_CHOICES.
    :param heun_churn: HeunChurn from the --heun_* flags (no churn where the caller has none).
    :param use_ddim, timestep_respacing: the flags' values, or None where the caller has none to check (in-training
        evaluation, whose defaults pick DDIM over "ddim50": a new --eval_sampler does not use them).
    :param prefix: the flags' prefix in error messages ("eval_" for image_train.py).
    :raises ValueError: naming both flags of a contradictory combination.
    """
    flag = f"--{prefix}sampler"
    if sampler not in ("",) + SAMPLER_CHOICES:
        raise ValueError(f"{flag} {sampler!r} is not one of {', '.join(SAMPLER_CHOICES)}")
    _check_churn(flag, sampler or ("ddim" if use_ddim else "ancestral"), heun_churn)
    if sampler in SAMPLERS:
        _refuse(use_ddim, f"{flag} {sampler} and --{prefix}use_ddim True contradict each other: drop --{prefix}use_ddim "
                "(it picks DDIM only when no sampler is named)")
        _refuse(timestep_respacing, f"{flag} {sampler} and --timestep_respacing {timestep_respacing!r} do not go "
                f"together: {sampler} places --{prefix}steps noise levels on the full schedule itself; drop "
                "--timestep_respacing")
        _refuse(ddim_eta, f"{flag} {sampler} and --{prefix}ddim_eta {ddim_eta} do not go together: η is DDIM's "
                "(use dpm++2m_sde for a stochastic sampler)")
        if steps < 0:
            raise ValueError(f"--{prefix}steps {steps} must be >= 1 (or 0 for {sampler}'s default, "
                             f"{DEFAULT_STEPS[sampler]})")
        if step_schedule not in ("",) + STEP_SCHEDULES:
            raise ValueError(f"--{prefix}step_schedule {step_schedule!r} is not one of {', '.join(STEP_SCHEDULES)}")
        return {"use_ddim": False, "ddim_eta": 0.0, "sampler": sampler, "steps": steps or DEFAULT_STEPS[sampler],
                "step_schedule": step_schedule or DEFAULT_STEP_SCHEDULE[sampler], "heun_churn": heun_churn}
    named = sampler or ("ddim" if use_ddim else "ancestral")
    for other, value in ((f"--{prefix}steps", steps), (f"--{prefix}step_schedule", step_schedule)):
        _refuse(value, f"{flag} {named} and {other} {value} do not go together: {named} steps through "
                f"--{prefix}timestep_respacing; {other} is for {', '.join(SAMPLERS)}")
    if sampler == "ancestral":
        _refuse(use_ddim, f"{flag} ancestral and --{prefix}use_ddim True contradict each other; drop one")
    # --ddim_eta without DDIM stays as ancestral sampling always had it: unused, but part of the folder's identity.
    return {"use_ddim": named == "ddim", "ddim_eta": ddim_eta, "sampler": "", "steps": 0, "step_schedule": "",
            "heun_churn": heun_churn}


def sampler_label(options):
    """The sampler a SamplingOptions runs: "ancestral", "ddim" or one of ode_samplers.SAMPLERS."""
    return options.sampler or ("ddim" if options.use_ddim else "ancestral")


def _check_churn(flag, named, heun_churn):
    """Refuse churn for another sampler than heun, and the other --heun_* flags without churn (they would do nothing)."""
    _refuse(heun_churn.churn and named != "heun", f"{flag} {named} and --heun_churn {heun_churn.churn:g} do not go "
            "together: churn is EDM Algorithm 2's noise increase of --sampler heun; drop --heun_churn or use heun")
    unused = [f"--heun_{key} {value:g}" for key, value in asdict(heun_churn).items()
              if key != "churn" and value != getattr(NO_CHURN, key)]
    _refuse(unused and not heun_churn.churn, f"{', '.join(unused)} without --heun_churn > 0 would change nothing "
            "(churn 0 is deterministic, EDM Algorithm 1); set --heun_churn or drop them")


def _refuse(value, message):
    if value:
        raise ValueError(message)
