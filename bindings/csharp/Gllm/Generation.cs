// Open requests. Replies are decoded and routed on the network thread; what a game sees (events, Task
// results) is posted to the game's thread through the client's EventQueue, in the order it arrived.
using System;
using System.Collections.Generic;
using System.Diagnostics;
using System.Text;
using System.Threading.Tasks;

namespace Gllm
{
    /// <summary>What the client needs from an open request. Called on the network thread.</summary>
    internal interface IReplyHandler
    {
        /// <summary>Handle one reply; true when it was the request's last.</summary>
        bool OnReply(string type, Dictionary<string, object> message);

        /// <summary>End the request with a client-side error (timeout, disconnect, close).</summary>
        void Fail(LlmError error);
    }

    /// <summary>
    /// One streaming generation. Subscribe to Token / Completed / Failed right after Generate returns (events
    /// are raised on the game's thread, never before the current frame's code has run), or await Text.
    /// Exactly one of Completed or Failed is raised, once.
    /// </summary>
    public sealed class Generation : IReplyHandler
    {
        readonly LlmClient client;
        readonly EventQueue events;
        readonly TaskCompletionSource<string> text = new TaskCompletionSource<string>(TaskCreationOptions.RunContinuationsAsynchronously);
        readonly StringBuilder soFar = new StringBuilder();
        readonly List<LlmToken> tokens = new List<LlmToken>();

        internal Generation(LlmClient client, long id, EventQueue events)
        {
            this.client = client;
            this.events = events;
            Id = id;
            // A game that only listens to events never looks at Text: keep its failure from being reported
            // as an unobserved task exception.
            text.Task.ContinueWith(t => t.Exception, TaskContinuationOptions.OnlyOnFaulted | TaskContinuationOptions.ExecuteSynchronously);
        }

        public long Id { get; private set; }

        /// <summary>A token arrived (game thread).</summary>
        public event Action<LlmToken> Token;
        /// <summary>The runtime finished the request: stop, length, or cancelled (game thread).</summary>
        public event Action<Completion> Completed;
        /// <summary>The request failed: a runtime error, a timeout, a lost connection (game thread).</summary>
        public event Action<LlmError> Failed;

        /// <summary>The whole text: completes after Completed (with the partial text when cancelled) and
        /// fails with LlmException after Failed.</summary>
        public Task<string> Text { get { return text.Task; } }

        /// <summary>The text of the tokens raised so far.</summary>
        public string TextSoFar { get { return soFar.ToString(); } }
        public IList<LlmToken> Tokens { get { return tokens.AsReadOnly(); } }
        public bool IsDone { get; private set; }
        public Completion Result { get; private set; }
        public LlmError Error { get; private set; }

        /// <summary>Ask the runtime to stop; it answers with Completed, FinishReason "cancelled". Safe to call
        /// at any time, any number of times.</summary>
        public void Cancel()
        {
            if (!IsDone) client.SendCancel(Id);
        }

        /// <summary>Something happens mid-line (the NPC is hit by an arrow): the text joins the context at the
        /// current position and the generation goes on from there; the next token's Injected says so.
        /// Ignored once the generation is over.</summary>
        public void Inject(string text)
        {
            if (!IsDone) client.SendInject(Id, "text", text);
        }

        /// <summary>Inject given token ids (see Inject(string)).</summary>
        public void Inject(int[] tokenIds)
        {
            if (!IsDone) client.SendInject(Id, "token_ids", new List<int>(tokenIds));
        }

        bool IReplyHandler.OnReply(string type, Dictionary<string, object> m)
        {
            switch (type)
            {
                case "token":
                    LlmToken token = LlmToken.From(m);
                    events.Post(() => RaiseToken(token));
                    return false;
                case "done":
                    Completion done = Completion.From(m);
                    events.Post(() => Finish(done));
                    return true;
                case "error":
                    ((IReplyHandler)this).Fail(new LlmError(Fields.String(m, "code"), Fields.String(m, "message")));
                    return true;
                default:
                    ((IReplyHandler)this).Fail(new LlmError("protocol", "unexpected '" + type + "' reply to a generate request"));
                    return true;
            }
        }

        void IReplyHandler.Fail(LlmError error)
        {
            events.Post(() => RaiseFailed(error));
        }

        void RaiseToken(LlmToken token)
        {
            if (IsDone) return;
            tokens.Add(token);
            soFar.Append(token.Text);
            if (Token != null) Token(token);
        }

        void Finish(Completion done)
        {
            if (IsDone) return;
            IsDone = true;
            Result = done;
            try
            {
                if (Completed != null) Completed(done);
            }
            finally
            {
                text.TrySetResult(done.Text);
            }
        }

        void RaiseFailed(LlmError error)
        {
            if (IsDone) return;
            IsDone = true;
            Error = error;
            try
            {
                if (Failed != null) Failed(error);
            }
            finally
            {
                text.TrySetException(new LlmException(error));
            }
        }
    }

    /// <summary>A request answered by one message (score, info, ping), as a Task completed on the game's thread.</summary>
    internal sealed class SingleReply<T> : IReplyHandler
    {
        readonly string expectedType;
        readonly Func<Dictionary<string, object>, T> parse;
        readonly EventQueue events;
        readonly TaskCompletionSource<T> result = new TaskCompletionSource<T>(TaskCreationOptions.RunContinuationsAsynchronously);
        readonly Stopwatch sent = Stopwatch.StartNew();

        public SingleReply(string expectedType, Func<Dictionary<string, object>, T> parse, EventQueue events)
        {
            this.expectedType = expectedType;
            this.parse = parse;
            this.events = events;
        }

        public Task<T> Task { get { return result.Task; } }

        /// <summary>Time since the request was made, for Ping's round trip.</summary>
        public double ElapsedMs { get { return sent.Elapsed.TotalMilliseconds; } }

        public bool OnReply(string type, Dictionary<string, object> m)
        {
            if (type == expectedType)
            {
                T value = parse(m);
                events.Post(() => result.TrySetResult(value));
            }
            else if (type == "error")
                Fail(new LlmError(Fields.String(m, "code"), Fields.String(m, "message")));
            else if (type == "done")
                Fail(new LlmError("cancelled", "the runtime cancelled the request"));
            else
                Fail(new LlmError("protocol", "unexpected '" + type + "' reply, expected '" + expectedType + "'"));
            return true;
        }

        public void Fail(LlmError error)
        {
            events.Post(() => result.TrySetException(new LlmException(error)));
        }
    }
}
