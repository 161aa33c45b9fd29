// A conversation as one byte array a game can put in its save files: the chat turns, and the runtime's KV
// of them (LlmClient.Snapshot), so that loading the save also spares the runtime from computing them again.
//
//   byte[] save = (await ConversationState.Save(client, turns)).ToBytes();   // File.WriteAllBytes(...)
//   ConversationState loaded = ConversationState.FromBytes(save);
//   await loaded.Load(client, pin: true);                                      // turns in loaded.Messages
//
// The bytes are a msgpack map: format "gllm-conversation", version 1, messages [[role, content], ...] and
// kv (the runtime's saved state, docs/protocol.md). A state saved by another model is refused by Load with
// code bad_request; the turns are still there, and the next line just computes them.
using System;
using System.Collections.Generic;
using System.Threading.Tasks;

namespace Gllm
{
    public sealed class ConversationState
    {
        const string Format = "gllm-conversation";
        const long Version = 1;

        public List<ChatMessage> Messages = new List<ChatMessage>();
        /// <summary>The runtime's saved state of Messages (the whole blocks of their prompt).</summary>
        public byte[] Kv = new byte[0];

        /// <summary>Snapshots the chat in the runtime and keeps its turns beside the state.</summary>
        public static async Task<ConversationState> Save(LlmClient client, IEnumerable<ChatMessage> messages)
        {
            var turns = new List<ChatMessage>(messages);
            SavedState saved = await client.Snapshot(Prompt.Chat(turns));
            return new ConversationState { Messages = turns, Kv = saved.State };
        }

        /// <summary>Restores the KV into the runtime (pinned: kept until LlmClient.Release(result.Id)).</summary>
        public Task<RestoreResult> Load(LlmClient client, bool pin = false)
        {
            return client.Restore(Kv, pin);
        }

        public byte[] ToBytes()
        {
            var turns = new List<object>();
            foreach (ChatMessage m in Messages) turns.Add(new List<object> { m.Role, m.Content });
            return MsgPack.Encode(new Dictionary<string, object>
            {
                { "format", Format }, { "version", Version }, { "messages", turns }, { "kv", Kv },
            });
        }

        /// <summary>Reads ToBytes' output; ArgumentException when the bytes are not a saved conversation.</summary>
        public static ConversationState FromBytes(byte[] data)
        {
            Dictionary<string, object> m;
            try
            {
                m = MsgPack.Decode(data) as Dictionary<string, object>;
            }
            catch (MsgPackException e)
            {
                throw new ArgumentException("not a saved conversation: " + e.Message);
            }
            if (m == null || Fields.String(m, "format") != Format)
                throw new ArgumentException("not a saved conversation (no format '" + Format + "')");
            if (Fields.Long(m, "version") != Version)
                throw new ArgumentException("saved conversation version " + Fields.Long(m, "version") + "; this client reads " + Version);
            var state = new ConversationState { Kv = Fields.Get(m, "kv") as byte[] ?? new byte[0] };
            foreach (object turn in Fields.List(m, "messages"))
            {
                var pair = turn as List<object>;
                if (pair == null || pair.Count != 2 || !(pair[0] is string) || !(pair[1] is string))
                    throw new ArgumentException("not a saved conversation: a turn is not [role, content]");
                state.Messages.Add(new ChatMessage((string)pair[0], (string)pair[1]));
            }
            return state;
        }
    }
}
