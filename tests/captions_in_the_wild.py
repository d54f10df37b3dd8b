"""Captions in the styles users bring, written for the tests: short COCO-style sentences (several per
image, with the near-duplicates and the "black and white photo" COCO is full of) and long
LLaVA-ReCap-style paragraphs."""

COCO_STYLE = {  # image id -> its captions
    101: ["A black and white photo of a man riding a horse.", "A man rides a horse in a black and white picture.",
          "An old photo of a person on horseback.", "A man on a horse in a field .", "A man on a horse in a field."],
    102: ["An orange cat sleeping on a blue couch.", "A cat curled up asleep on a couch.",
          "An orange cat lies on the sofa.", "A fluffy orange cat naps on a blue sofa.", "A cat is sleeping on a couch"],
    103: ["A red fire hydrant on the side of a street.", "A fire hydrant painted red next to a road.",
          "A red hydrant sits on a sidewalk.", "The red fire hydrant is by the curb.", "A hydrant near a parked car."],
    104: ["Two dogs playing with a frisbee in the grass.", "Two dogs run after a frisbee.",
          "A pair of dogs chasing a flying disc in a park.", "Two brown dogs play in a grassy field.", "Dogs playing in a park."],
    105: ["A man in a red shirt holding a tennis racket.", "A tennis player swings his racket on the court.",
          "A man wearing a red shirt plays tennis.", "A person hits a tennis ball with a racket.",
          "A tennis player in red on a clay court."],
    106: ["A large white bus parked at the station.", "A white bus waiting at a bus stop.",
          "A big bus is parked near a building.", "A city bus stopped on the street.", "A white bus sits at the stop."],
    107: ["A small boat floating on a calm lake.", "A little boat on the water at sunset.",
          "A boat drifts on a still lake.", "A small wooden boat on a lake.", "A rowboat sits on the lake."],
    108: ["A green apple sitting next to a banana on a table.", "Fruit on a wooden table.",
          "An apple and a banana on a table.", "A green apple beside a yellow banana.", "Some fruit sitting on a table."],
    109: ["A woman holding an open umbrella in the rain.", "A woman walks with an umbrella on a wet street.",
          "A person carrying a black umbrella.", "A lady with an umbrella crossing the street.",
          "A woman in a yellow coat holds an umbrella."],
    110: ["A red double decker bus driving down a street.", "A double decker bus on a city road.",
          "A red bus drives past shops.", "A tall red bus on the street.", "A double decker bus in traffic."],
    111: ["Three horses grazing in a green pasture.", "Horses eating grass in a field.",
          "Three brown horses stand in a meadow.", "A few horses in a grassy field.", "Horses graze near a fence."],
    112: ["A yellow taxi waiting at a red light.", "A taxi stopped at a traffic light.",
          "A yellow cab on a busy street.", "A cab waits at an intersection.", "A yellow car stops at the light."],
    113: ["An empty bench in a quiet park.", "A wooden bench under a tree.", "A park bench with nobody on it.",
          "An empty wooden bench beside a path.", "A bench sits alone in the park."],
    114: ["A kid flying a blue kite on the beach.", "A child holds a kite string on the sand.",
          "A blue kite flies above the beach.", "A young boy with a kite by the sea.", "A kite in the sky over a beach."],
    115: ["A brown teddy bear sitting on a bed.", "A stuffed bear on a bed.", "A teddy bear lies on the pillow.",
          "A small brown teddy bear on white sheets.", "A toy bear sits on the bed."],
    116: ["A plate with a sandwich and some chips.", "A sandwich cut in half on a plate.",
          "A white plate holds a sandwich.", "Lunch of a sandwich and chips.", "A sandwich next to a pickle on a plate."],
    117: ["A giraffe standing next to a tall tree.", "A giraffe eats leaves from a tree.",
          "A tall giraffe in a zoo enclosure.", "A giraffe reaching up to a branch.", "A giraffe near some trees."],
    118: ["A man riding a wave on top of a surfboard.", "A surfer rides a big wave.",
          "A person surfing in the ocean.", "A surfer in a black wetsuit on a wave.", "A man surfs a large wave."],
}

RECAP_STYLE = [
    "The image shows a busy city street at dusk. Mr. Lee, a street vendor in a green apron, stands behind a cart "
    "selling roasted chestnuts. Several pedestrians pass by, some carrying shopping bags, and the lights of the "
    "shops reflect on the wet pavement. In the background a red tram waits at a stop.",
    "In this photograph, a small brown dog sits on a wooden porch. The dog looks toward the camera with its ears "
    "raised. Behind it, a screen door is partly open and a pair of boots rests by the wall. The late afternoon "
    "light casts long shadows across the boards.",
    "A wide view of St. Mark's Square shows crowds of tourists and pigeons. A large white church stands at the far "
    "end, its domes catching the sun. Cafe tables with umbrellas line the left side of the square, and a band plays "
    "on a small stage.",
    "The picture captures a kitchen counter with an empty glass bowl, a wooden cutting board and a knife. A few "
    "green peppers lie beside the board. Sunlight enters through a window above the sink, where a plant grows in a "
    "clay pot.",
    "Dr. Patel, wearing a white coat, talks with a patient in a bright clinic room. A blue curtain hangs behind "
    "them and a chart is pinned to the wall. The patient holds a folded paper and listens carefully.",
    "A close view of a red sports car parked on a gravel drive. The car's paint is glossy and the wheels are "
    "polished. Trees line the drive, and a stone house is visible in the distance under a cloudy sky.",
]
