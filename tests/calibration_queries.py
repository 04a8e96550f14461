"""Easy and hard queries kept apart from any test's own queries: tests that need a routing threshold set it
on these (the LangChain and LlamaIndex easy/hard routing tests), and check the routing on others."""

EASY_CALIBRATION = ["What is 3 + 4?", "What is the capital of Italy?", "How many wheels does a bicycle have?",
                    "What colour is grass?", "What is 9 minus 5?", "How many months are in a year?",
                    "What is the opposite of up?", "Which animal barks?"]
HARD_CALIBRATION = [
    "Let G be a group of order 2p for an odd prime p. Using Sylow's theorems, show that G is either cyclic or "
    "dihedral, and justify every step.",
    "A uniform ladder of length 4 m and mass 10 kg leans against a frictionless wall at 60 degrees to the floor; "
    "find the minimum coefficient of static friction at the floor that keeps it from slipping, showing each step.",
    "Derive the Black-Scholes partial differential equation from a delta-hedged portfolio, state every assumption "
    "you use, and solve it for a European call with the heat-equation substitution.",
    "Determine the Galois group of x^4 - 2 over the rationals, list every intermediate field of its splitting "
    "field and match each one to its subgroup under the fundamental theorem.",
    "In a Solow growth model with technological progress at rate g, population growth n and depreciation d, "
    "derive the steady-state capital per effective worker and the golden-rule savings rate.",
    "Evaluate the contour integral of e^(iz)/(z^2 + 4z + 5) over the real line with the residue theorem, "
    "justifying why the arc at infinity vanishes.",
    "Given the recurrence T(n) = 2T(n/2) + n/log n, show why the master theorem does not apply and derive the "
    "asymptotic growth by unrolling the recursion.",
    "Explain how the lac operon integrates catabolite repression through cAMP-CAP with induction by allolactose, "
    "and predict the expression level in each of the four glucose/lactose conditions.",
]
