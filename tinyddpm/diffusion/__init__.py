"""The math of diffusion: schedules, the Gaussian identities, the mixture oracle, distances.

Depends on nothing else in the package (except the boundary checks): everything here is exact,
float64 where it matters, and checked in closed form by the book's first four chapters.
"""
