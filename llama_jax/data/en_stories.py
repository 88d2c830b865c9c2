"""Simple English stories in the style of TinyStories, written for this project (not copied).

Used by `llama-jax demo --data` as the held-out English eval set for the stories260K base: the
text that base was trained on is children's stories with a small vocabulary, so its English
bits per character before and after Chinese continued pretraining measure forgetting on text it
knows.  None of these stories is in any training set of this project.
"""

STORIES = [
    "Once upon a time, there was a little dog named Max. Max liked to run in the big green park. "
    "One day, Max saw a red ball under a tree. He ran to the ball and picked it up. Max was very happy. "
    "He took the ball home to show his friend Tom. Tom smiled and said, \"Good dog, Max!\"",
    "Lily had a small blue box. She kept her best toys in the box. One morning, the box was gone. "
    "Lily looked under her bed and behind the door. Then she saw her cat sitting on the box in the sun. "
    "Lily laughed and said, \"You like my box too!\" She gave the cat a soft hug.",
    "Ben wanted to help his mom in the kitchen. Mom was making a cake for Dad. Ben put the eggs in the "
    "bowl and mixed them with a big spoon. The cake went into the hot oven. When it was ready, it smelled "
    "so good. Dad came home and said it was the best cake ever. Ben felt proud.",
    "There was a tiny bird who could not fly. The bird was sad because all his friends could fly high in "
    "the sky. A kind girl named Sue found the bird. She gave him water and seeds every day. After a few "
    "days, the bird flapped his wings and flew up. He sang a happy song for Sue.",
    "Tim and Anna went to the beach with their mom. They built a big sand castle near the water. A wave "
    "came and took part of the castle away. Anna was sad, but Tim said, \"Let's build it again!\" They "
    "worked together and made the castle even bigger. Mom took a picture of them.",
    "One day, a little girl named Mia found a shiny rock in the garden. She thought it was magic. She "
    "held the rock and made a wish. She wished for a sunny day so she could play outside. The next "
    "morning, the sun was bright and warm. Mia ran outside with her rock and played all day.",
    "Sam had a red kite. He took it to the hill on a windy day. The wind pulled the kite up high. Sam held "
    "the string tight. Then the string broke and the kite flew away. Sam was sad. His friend Jack helped "
    "him find the kite in a tree. They got it down and flew it again.",
    "A big bear lived in the woods. He was hungry and wanted some honey. He saw a tree with bees. The bear "
    "was careful and slow. He asked the bees, \"May I have a little honey?\" The bees said yes, but only a "
    "little. The bear said thank you and shared the honey with his friends.",
    "Lucy liked to paint. She painted a yellow sun, a green tree and a blue sky. Her brother wanted to "
    "paint too, but he did not have a brush. Lucy gave him one of her brushes. They painted a big picture "
    "together. Mom put the picture on the wall, and they were very happy.",
    "Once there was a little boat. The boat wanted to go to the sea. One day, a strong wind came and "
    "pushed the boat out of the river. The boat saw fish, birds and a big whale. The whale said, \"Hello, "
    "little boat!\" The boat was not scared anymore. It had many new friends.",
    "Tom lost his shoe at the park. He looked everywhere, but he could not find it. His dog Spot came "
    "running with something in his mouth. It was the shoe! Tom laughed and hugged Spot. \"You are the best "
    "dog,\" he said. They walked home together in the warm evening.",
    "Emma had a garden with many flowers. Every day she gave them water. One day, she saw a small frog "
    "sitting on a leaf. The frog said, \"Thank you for the water. Your garden is my home.\" Emma smiled. "
    "She was glad that her garden was a home for the little frog.",
]
