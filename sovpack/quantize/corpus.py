"""The built-in calibration text: varied registers (prose, instructions, dialogue, code, numbers, several
languages) so every weight sees typical activations. Written for sovpack; none of it is a parity prompt, so
the parity gate judges the quantized artifact on text its calibration never saw."""

from __future__ import annotations

CALIBRATION_TEXT: tuple[str, ...] = (
    "Rivers shape the land slowly. Over thousands of years a stream cuts a valley, carries sand to the plain "
    "and builds a delta where it meets the sea. Farmers settled on those deltas because the soil was rich, and "
    "the first cities grew where boats could land and roads could cross the water.",
    "To replace a bicycle tyre, release the brake, open the quick-release lever and take the wheel out. Push "
    "one side of the tyre over the rim with two levers, pull out the old tube and check the inside of the tyre "
    "for glass or thorns before fitting the new tube. Inflate it a little, seat the tyre, then pump it to the "
    "pressure printed on the sidewall.",
    "User: Can you suggest a dinner that takes less than thirty minutes?\nAssistant: Sure. Fry sliced garlic "
    "in olive oil, add a tin of chopped tomatoes and a pinch of chili, simmer for ten minutes and toss with "
    "pasta. Finish with basil and grated cheese. It serves two people.",
    "def moving_average(values, window):\n    total = sum(values[:window])\n    result = [total / window]\n"
    "    for i in range(window, len(values)):\n        total += values[i] - values[i - window]\n"
    "        result.append(total / window)\n    return result\n",
    "The quarterly report lists revenue of 4.7 million euros, up 12 percent on the previous year, while costs "
    "rose by 3.1 percent. The board proposed a dividend of 0.45 euros per share, payable on 15 June 2026.",
    "La bibliothèque municipale ouvre ses portes à neuf heures. Les lecteurs peuvent emprunter jusqu'à six "
    "livres pendant trois semaines, et les enfants trouvent au premier étage des albums et des bandes dessinées.",
    "Der Zug nach München hat zwanzig Minuten Verspätung, weil ein Signal zwischen zwei Bahnhöfen ausgefallen "
    "ist. Reisende mit Anschluss sollen sich an das Personal am Bahnsteig wenden.",
    "El mercado abre los sábados por la mañana. Hay frutas de temporada, pan recién hecho y quesos de las "
    "granjas cercanas; muchos vecinos van temprano para encontrar los mejores tomates.",
    "SELECT city, COUNT(*) AS stations FROM weather_stations WHERE elevation > 1500 GROUP BY city ORDER BY "
    "stations DESC LIMIT 10;",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen. The light reactions happen in "
    "the thylakoid membranes, where chlorophyll absorbs red and blue light, and the Calvin cycle in the stroma "
    "fixes carbon into three-carbon molecules.",
    "Meeting notes: the team agreed to move the release to Thursday, to add two integration tests for the "
    "payment service and to ask the security group to review the new login flow before it ships.",
    "天气预报说明天有小雨，气温在十五到二十度之间。出门的时候记得带伞。",  # noqa: RUF001
)
